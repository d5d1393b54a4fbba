"""Does HNI's gain on val come from scenes the CLIP trained on? (issue 10: why val and held-out disagree)

    python benchmarks/familiar_scenes.py [--root /work/runs11] [--out benchmarks/results/familiar_scenes.md]

Val's scenes are drawn like the training scenes, so some of them say exactly what a training scene says
(`scene_key`: background, objects, counts, positions); the held-out scenes never do, but some of their
negatives are word for word a training image's description. For each HNI comparison of the README (generation
1, 3 seeds, paired by seed), negative accuracy split by that: val rows with a familiar / a new scene, and
held-out `test_negatives` negatives that are / are not a training description. Reads the dataset plan's scene
records of the demo store (`meta`), which the pipeline never uses; a diagnosis only, nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's own `cycle`

from demo_seeds import paired  # noqa: E402
from demo_variant import run_dir  # noqa: E402

from cycle.clip.saved import load_clip  # noqa: E402
from cycle.data.emoji.scenes import scene_key  # noqa: E402
from cycle.evaluate.datasets import load_store_split  # noqa: E402
from cycle.evaluate.metrics import negative_metrics  # noqa: E402
from cycle.evaluate.run import embed_images, embed_texts  # noqa: E402
from cycle.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
BATCH = 256
# (what is compared, HNI run label, the same without HNI), generation 1; labels as in `large_heldout.py`.
COMPARISONS = [
    ("HNI over the teacher's texts for seed images", "initseedthni", "initseedt"),
    ("HNI at weight 0.3 over the teacher's texts", "initseedthni03", "initseedt"),
    ("HNI pair mode over the teacher's texts", "initseedthnipair", "initseedt"),
    ("HNI on mined negatives over the teacher's texts", "initseedtmined", "initseedt"),
    ("HNI at weight 0.3 on mined negatives over the teacher's texts", "initseedtmined03", "initseedt"),
    ("HNI at weight 0.3, from the previous CLIP", "init03", "init"),
    ("HNI at weight 1, from random weights", "stctext30", "stc30nohni"),
]


def _key(meta: dict) -> str:
    return json.dumps(scene_key(meta["scene"]))


def groups(store: Store) -> tuple[dict, dict]:
    """Per split: {group name: row ids (val) or (row id, negative text) pairs (test_negatives)}."""
    train = [json.loads(m) for m in store.read("samples", ["meta"], "split = 'train'").column("meta").to_pylist()]
    keys, descriptions = {_key(m) for m in train}, {m["clean"] for m in train}
    val = {
        r["id"]: _key(json.loads(r["meta"])) in keys
        for r in store.read("samples", ["id", "meta"], "split = 'val'").to_pylist()
    }
    negs = {
        (r["id"], n["text"]): n["text"] in descriptions
        for r in store.read("samples", ["id", "meta"], "split = 'test_negatives'").to_pylist()
        for n in json.loads(r["meta"])["negatives"]
    }
    return (
        {
            "val, familiar scene": {i for i, f in val.items() if f},
            "val, new scene": {i for i, f in val.items() if not f},
        },
        {
            "held-out, negative is a training description": {k for k, f in negs.items() if f},
            "held-out, other negatives": {k for k, f in negs.items() if not f},
        },
    )


def accuracies(clip: Path, store: Store, val_groups: dict, neg_groups: dict) -> dict[str, float]:
    model, preprocess, tokenizer, _ = load_clip(clip)
    out = {}
    for split, wanted in (("val", val_groups), ("test_negatives", neg_groups)):
        ev = load_store_split(store, split)
        with torch.no_grad():
            images = embed_images(model, preprocess, ev, BATCH, "cpu", progress=False)
        pos = embed_texts(model, tokenizer, ev.positives, BATCH, "cpu", progress=False)
        pairs = [(i, n) for i, row in enumerate(ev.negatives) for n in row]
        neg = embed_texts(model, tokenizer, [n["text"] for _, n in pairs], BATCH, "cpu", progress=False)
        for name, members in wanted.items():
            keep = [j for j, (i, n) in enumerate(pairs) if ev.keys[i] in members or (ev.keys[i], n["text"]) in members]
            index = [pairs[j][0] for j in keep]
            out[name] = negative_metrics(images, pos, neg[keep], index, [pairs[j][1]["edit"] for j in keep])["acc"]
            out[f"{name} (n)"] = len(keep)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/work/runs11"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "familiar_scenes.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    store = Store(run_dir(args.root, SEEDS[0]) / "lance")
    val_groups, neg_groups = groups(store)
    names = [*val_groups, *neg_groups]
    lines = [
        "# HNI's negative accuracy on familiar and new scenes",
        "",
        f"`python benchmarks/familiar_scenes.py --root {args.root}`: generation 1, 3 seeds, HNI minus the same run "
        "without HNI (paired by seed; seeds up +, down -). Groups: val rows whose scene says exactly what a training "
        "scene says, and the rest; held-out negatives that are word for word a training image's description, and "
        "the rest. Counts: " + ", ".join(f"{n}: {len(m)}" for n, m in {**val_groups, **neg_groups}.items()) + ".",
        "",
        "| comparison | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for title, variant, base in COMPARISONS:
        acc = {
            label: [
                accuracies(run_dir(args.root, s, label) / "gen-001" / "clip" / "model", store, val_groups, neg_groups)
                for s in SEEDS
            ]
            for label in (variant, base)
        }
        cells = [paired([a[n] for a in acc[base]], [a[n] for a in acc[variant]]) for n in names]
        lines.append(f"| {title} (`{variant}` vs `{base}`) | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
