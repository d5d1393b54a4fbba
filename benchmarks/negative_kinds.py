"""What kind of minimal edit are the description negatives HNI trains on? (issue 10: why HNI does not help)

    python benchmarks/negative_kinds.py [--root /work/runs11] [--label stc30nohni2]
                                        [--out benchmarks/results/negative_kinds.md]

Classifies each (description, negative description) pair by the words that differ: identical, position
(only spatial words changed), count (a number word changed), background colour, object (any other change of a
few words), rewrite (more than `loss.neg_max_edit_words` words). Sources: the teacher's exact edits (the 1,600
seed annotations the annotator is fine-tuned on: the dataset plan, text only), the annotator's own negatives in
generations 1 and 2 of the runs `<root>/demo-seed-S-<label>` (seeds 0-2), what `loss.neg_repair: tags`
(`clip/negatives.tag_edit`) makes of the annotator's rows without a usable edit, and, for reference, the
held-out `test_negatives` split's edits (its own labels). A diagnosis only: the scene graph is never used to
choose or filter a negative.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cycle.clip.negatives import SWAP_CLASSES, negative_part_kind, tag_edit  # noqa: E402
from cycle.config import load_config  # noqa: E402
from cycle.data.emoji.plan import plan_emoji_scenes  # noqa: E402
from cycle.store import Store  # noqa: E402

SPATIAL = {
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "centre",
    "middle",
    "above",
    "below",
    "front",
    "behind",
    "in",
    "at",
}
NUMBERS = {"one", *SWAP_CLASSES[0]}  # "a"/"an" alone change with the noun ("an apple" -> "a pear")
COLOURS = set(SWAP_CLASSES[-1])
KINDS = ("identical", "position", "count", "background colour", "object", "rewrite")


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?").lower() for w in text.split()]


def edit_kind(pos: str, neg: str, max_edit_words: int) -> str:
    kind = negative_part_kind(pos, neg, max_edit_words)
    if kind != "edit":
        return {"same": "identical", "far": "rewrite"}[kind]
    a, b = _words(pos), _words(neg)
    if len(a) == len(b):  # word for word: a swap of two objects' places changes only the spatial words
        changed = {w for x, y in zip(a, b) if x != y for w in (x, y)}
        after = next((a[i + 1] for i in range(len(a) - 1, -1, -1) if a[i] != b[i] and i + 1 < len(a)), "")
    else:  # the differing span between the common prefix and suffix
        start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        end = 0
        while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
            end += 1
        changed = set(a[start : len(a) - end]) | set(b[start : len(b) - end])
        after = (a[len(a) - end : len(a) - end + 1] or [""])[0]
    if changed and changed <= SPATIAL:
        return "position"
    if changed & NUMBERS:
        return "count"
    if changed <= COLOURS and after == "background":
        return "background colour"
    return "object"


def shares(counter: Counter) -> str:
    n = sum(counter.values())
    return f"{n} | " + " | ".join(f"{counter[k] / n:.3f}" if n else "-" for k in KINDS)


def annotator_rows(root: Path, label: str, gen: int) -> list[dict]:
    rows = []
    for seed in (0, 1, 2):
        store = Store(root / f"demo-seed-{seed}-{label}" / "lance")
        rows += store.read("annotations", ["desc", "neg_desc", "tags", "neg_tags"], f"generation = {gen}").to_pylist()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/work/runs11"))
    ap.add_argument("--label", default="stc30nohni2", help="the demo_variant.py runs whose annotations are read")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "negative_kinds.md")
    args = ap.parse_args()
    cfg = load_config(REPO / "configs" / "emoji.yaml")
    bound = cfg.loss.neg_max_edit_words
    table = []

    teacher = Counter()
    for s in plan_emoji_scenes(cfg.data.emoji).seeds:
        teacher.update(edit_kind(p, q, bound) for p, q in zip(s["desc"], s["neg_desc"]))
    table.append(("teacher's seed annotations (what SFT teaches)", teacher))

    rng = np.random.default_rng(0)
    for gen in (1, 2):
        own, repaired = Counter(), Counter()
        for r in annotator_rows(args.root, args.label, gen):
            pos, neg = " ".join(r["desc"] or []), " ".join(r["neg_desc"] or [])
            kind = edit_kind(pos, neg, bound) if neg else "identical"
            own[kind] += 1
            if kind in ("identical", "rewrite"):
                aligned = len(r["tags"] or []) == len(r["neg_tags"] or [])
                edit = tag_edit(pos, r["tags"] or [], r["neg_tags"] or [], rng) if aligned else ""
                repaired[edit_kind(pos, edit, bound) if edit else "identical"] += 1
            else:
                repaired[kind] += 1
        table.append((f"annotator, generation {gen} (3 seeds)", own))
        table.append((f"generation {gen} with `neg_repair: tags`", repaired))

    store = Store(args.root / f"demo-seed-0-{args.label}" / "lance")
    held, labelled = Counter(), Counter()
    for meta in store.read("samples", ["meta"], "split = 'test_negatives'").column("meta").to_pylist():
        ann = json.loads(meta)
        held.update(edit_kind(ann["positive"], n["text"], bound) for n in ann["negatives"])
        labelled.update(n["edit"] for n in ann["negatives"])
    table.append(("held-out `test_negatives` (reference)", held))

    lines = [
        "# Kinds of description negatives",
        "",
        f"`python benchmarks/negative_kinds.py --root {args.root} --label {args.label}`: each (description, negative) "
        "pair classified by the words that differ (see the script). Rows: pairs; cells: shares.",
        "",
        "| source | pairs | " + " | ".join(KINDS) + " |",
        "|---|---:|" + "---:|" * len(KINDS),
        *(f"| {name} | {shares(c)} |" for name, c in table),
        "",
        "The held-out split's own labels, for the classifier's sake: "
        + ", ".join(f"{k} {v}" for k, v in sorted(labelled.items()))
        + " (a relation edit between objects of different name lengths is counted as object here)."
        "",
    ]
    text = "\n".join(lines)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
