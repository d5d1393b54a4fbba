"""Which rating picks the truest annotations for `lvlm.align_add_best` / `lvlm.sft_add_best`?

    python benchmarks/best_annotations.py RUN_DIR [RUN_DIR ...] [--generation 1]
                                          [--out benchmarks/results/best_annotations.md]

For generation G's usable annotations of training images outside SFT (not teacher seeds) of finished demo
runs, three ratings against each row's fact-F1 (its `desc` + `tags` against the scene graph,
`cycle.data.emoji.facts`; the truth is used to judge the ratings, never by them):
- `margin`: the stored `annotations.score`, CLIP_{G-1}'s cos(image, desc) - cos(image, neg_desc);
- `fit CLIP_{G-1}`: CLIP_{G-1}'s mean cos(image, desc sentence) (the tower the annotator looked through);
- `fit CLIP_G`: the same by the CLIP trained on these annotations (what generation G+1 rates them with).
Per rating: Spearman's rank correlation with fact-F1 and the mean fact-F1 of the best 10/25/50%. Train
images only: no held-out split is read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cycle.annotate.score import ClipScorer  # noqa: E402
from cycle.data.emoji.facts import fact_prf, scene_facts, text_facts  # noqa: E402
from cycle.data.emoji.vocab import candidates  # noqa: E402
from cycle.store import USABLE, Store  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "best_annotations.md"
SHARES = (0.10, 0.25, 0.50)
BATCH = 256


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(float)


def measure(run: Path, generation: int) -> dict:
    store = Store(run / "lance")
    names = tuple(o.name for o in candidates())
    where = f"generation = {generation} AND {USABLE}"
    rows = store.read("annotations", ["id", "desc", "neg_desc", "tags", "score"], where).to_pylist()
    seeds = store.present("teacher", [r["id"] for r in rows])
    rows = [r for r in rows if r["id"] not in seeds]
    samples = store.rows_by_id("samples", [r["id"] for r in rows], ["id", "image", "meta"], "split = 'train'")
    rows = [r for r in rows if r["id"] in samples]
    f1 = np.array(
        [
            fact_prf(
                text_facts(list(r["desc"]) + list(r["tags"]), names),
                scene_facts(json.loads(samples[r["id"]]["meta"])["scene"]),
            )["f1"]
            for r in rows
        ]
    )
    ratings = {"margin (stored)": np.array([r["score"] if r["score"] is not None else np.nan for r in rows])}
    for g in (generation - 1, generation):
        scorer = ClipScorer(run / f"gen-{g:03d}" / "clip" / "model")
        fit = []
        for i in range(0, len(rows), BATCH):
            chunk = rows[i : i + BATCH]
            fit += scorer.fit([samples[r["id"]]["image"] for r in chunk], chunk)
        ratings[f"fit CLIP_{g}"] = np.array([np.nan if v is None else v for v in fit])
    out = {"rows": len(rows), "f1_mean": float(f1.mean()), "ratings": {}}
    for name, v in ratings.items():
        ok = ~np.isnan(v)
        order = np.argsort(-v[ok], kind="stable")
        out["ratings"][name] = {
            "spearman": float(np.corrcoef(ranks(v[ok]), ranks(f1[ok]))[0, 1]),
            "zero_share": float(np.mean(v[ok] == 0)),
            **{f"top{s:.2f}": float(f1[ok][order[: int(s * ok.sum())]].mean()) for s in SHARES},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--generation", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    per_run = {str(run): measure(run, args.generation) for run in args.runs}
    names = list(next(iter(per_run.values()))["ratings"])

    def cell(name: str, key: str) -> str:
        vals = [r["ratings"][name][key] for r in per_run.values()]
        return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}"

    f1s = [r["f1_mean"] for r in per_run.values()]
    lines = [
        f"# Rating generation {args.generation}'s annotations for the next generation's LVLM data",
        "",
        f"Written by `benchmarks/best_annotations.py`: {len(per_run)} run(s), usable annotations of training "
        f"images outside SFT ({statistics.mean(r['rows'] for r in per_run.values()):.0f} per run), each "
        "rating against the row's fact-F1 (desc + tags vs the scene graph). Mean ± std over runs. "
        f"All rows: fact-F1 {statistics.mean(f1s):.3f} ± {statistics.pstdev(f1s):.3f}.",
        "",
        "| rating | Spearman with fact-F1 | share rated exactly 0 | "
        + " | ".join(f"fact-F1 of the best {int(s * 100)}%" for s in SHARES)
        + " |",
        "|---|---:|---:|" + "---:|" * len(SHARES),
    ]
    for name in names:
        lines.append(
            f"| {name} | {cell(name, 'spearman')} | {cell(name, 'zero_share')} | "
            + " | ".join(cell(name, f"top{s:.2f}") for s in SHARES)
            + " |"
        )
    lines += ["", "Runs: " + ", ".join(f"`{Path(r).name}`" for r in per_run), ""]
    args.out.write_text("\n".join(lines))
    args.out.with_suffix(".json").write_text(json.dumps(per_run, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
