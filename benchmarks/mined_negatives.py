"""How many of HNI's negatives are texts some training image is described by, with the teacher's edits and with
mined negatives (`loss.hni_negatives: mined`; issue 10: does text familiarity tell HNI's negatives apart?).

    python benchmarks/mined_negatives.py [--root /work/runs11] [--label initseedtmined]

Per seed, from the store of the generation-1 run `demo-seed-S-<label>` and the texts its training read (read
by the train stage's own `_annotated_records`: the teacher's formulas for the seed images, `loss.seed_texts:
teacher`; the annotator's usable generation-1 annotation for the others): the share of the teacher's negative
sentences that are word for word a training sentence; how many distinct training sentences have a one-word
neighbour (`negatives.neighbour_index`); the share of images with a description that one of their sentences'
neighbours (none of their own) could replace; and, from that run's training log, the share of rows that had a
usable negative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's own `cycle`

from demo_variant import run_dir  # noqa: E402

from cycle.clip.negatives import neighbour_index, words_of  # noqa: E402
from cycle.clip.train import _annotated_records  # noqa: E402  the train stage's own read of its texts
from cycle.state import RunState  # noqa: E402
from cycle.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


def measure(run: Path) -> dict:
    state = RunState(run)
    data = {"store_uri": str(run / "lance"), "storage_options": None, "prefer": "teacher"}
    pins = {
        "samples": state.outputs(0, "data")["samples_version"],
        "teacher": state.outputs(0, "data")["teacher_version"],
        "annotations": state.outputs(1, "annotate")["annotations_version"],
    }
    desc = [rec["desc"] for rec in _annotated_records(data, pins, 1)]  # what generation 1's training reads
    teacher = Store(run / "lance").read("teacher", ["neg_desc"], version=pins["teacher"]).column("neg_desc")
    teacher_negs = [n for negs in teacher.to_pylist() for n in negs or []]
    sentences = {words_of(s) for d in desc for s in d}
    index = neighbour_index(sorted({s for d in desc for s in d}))
    described = [d for d in desc if d]

    def minable(d: list) -> bool:
        own = {words_of(s) for s in d}
        return any(words_of(n) not in own for s in d for n in index.get(s, ()))

    log = [json.loads(line) for line in (run / "gen-001" / "clip" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "neg_share" in r]
    return {
        "teacher negatives that are a training sentence": sum(words_of(n) in sentences for n in teacher_negs)
        / len(teacher_negs),
        "distinct training sentences": len(sentences),
        "with a one-word neighbour": len({words_of(s) for s in index}),
        "images whose description has a mined negative": sum(map(minable, described)) / len(described),
        "rows with a usable negative in training (log mean)": statistics.mean(r["neg_share"] for r in steps),
        "description rows in training (log mean)": statistics.mean(r["long_text_share"] for r in steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/work/runs11"))
    ap.add_argument("--label", default="initseedtmined")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "mined_negatives.md")
    args = ap.parse_args()
    per_seed = {s: measure(run_dir(args.root, s, args.label)) for s in SEEDS}
    names = list(per_seed[SEEDS[0]])
    lines = [
        "# Mined negatives: how familiar HNI's negatives are",
        "",
        f"`python benchmarks/mined_negatives.py --root {args.root} --label {args.label}` (generation 1 of the runs "
        f"`demo-seed-S-{args.label}`; the texts training reads).",
        "",
        "| measure | " + " | ".join(f"seed {s}" for s in SEEDS) + " |",
        "|---|" + "---:|" * len(SEEDS),
    ]
    for n in names:
        cells = [f"{v:.3f}" if isinstance(v, float) else f"{v:,}" for v in (per_seed[s][n] for s in SEEDS)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
