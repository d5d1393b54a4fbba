"""Issue 3's loss ablation redone at the demo's setting: the five variants, and the other loss options, 3 seeds.

    python benchmarks/ablation_demo.py [--root /work/runs11] [--out benchmarks/results/ablation_demo.md]

`evidence_loss.py` ran the five variants (alt-text only; annotations with L_clip; + HNI; + STC; all) at an
earlier, smaller demo where the CLIPs learned almost nothing. Here every variant but (a) is CLIP 1 of the
shipped config (`configs/emoji.yaml`; HNI aside) trained again on the same generation-1 annotations: forked by
`demo_variant.py --base initseedt --from-gen 1 --stage train` from the no-HNI chain's generation 1, so the
pairs share the store, the annotator, CLIP 0 and the seed, and differ in the loss only. (a) is CLIP 0 itself
(generation 0: the alt-text, 20 epochs from random weights): CLIP 1 starts from it and trains 20 epochs more,
so (b) - (a) is the annotations plus 20 epochs (the 40-epoch row separates the epochs from the rest).

Reads each run's recorded metrics (`state.json`), the 10x held-out sets' figures from `large_heldout.json`
(run `large_heldout.py` first; a CLIP it has not measured leaves its cells empty) and the STC term from each
training's `log.jsonl`. `val` chooses; the held-out columns are reported, never tuned on. Writes
`ablation_demo.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's own `cycle`

from demo_seeds import METRICS, paired  # noqa: E402
from demo_variant import done, run_dir, state_of  # noqa: E402
from large_heldout import clip_key  # noqa: E402
from tune_loss_val import stc_fall  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)
# (row name, demo_variant.py label, generation). The first five are the ablation's variants.
VARIANTS = {
    "a": ("(a) alt-text only (CLIP 0)", "", 0),
    "b": ("(b) annotations, L_clip only", "initseedtnostc", 1),
    "c": ("(c) L_clip + HNI (mined negatives, 0.3)", "initseedtnostcmined03", 1),
    "d": ("(d) L_clip + STC (text head, 30)", "initseedt", 1),
    "e": ("(e) L_clip + STC + HNI (mined, 0.3)", "initseedtmined03", 1),
    "hni1": ("STC + HNI, batch mode, weight 1 (the teacher's edits)", "initseedthni", 1),
    "hni03": ("STC + HNI, batch mode, weight 0.3", "initseedthni03", 1),
    "pair": ("STC + HNI, pair mode, weight 1", "initseedthnipair", 1),
    "mined01": ("STC + HNI, mined negatives, weight 0.1 (shipped)", "initseedtmined01", 1),
    "mined05": ("STC + HNI, mined negatives, weight 0.5", "initseedtmined05", 1),
    "mined1": ("STC + HNI, mined negatives, weight 1", "initseedtmined", 1),
    "e40": ("(d) trained 40 epochs instead of 20", "initseedt40", 1),
}
ABLATION = ("a", "b", "c", "d", "e")
# (what is compared, variant, base): paired by seed.
CONTRASTS = [
    ("annotations vs alt-text (b - a)", "b", "a"),
    ("STC vs none (d - b)", "d", "b"),
    ("HNI vs none, without STC (c - b)", "c", "b"),
    ("HNI vs none, with STC (e - d)", "e", "d"),
    ("both vs neither (e - b)", "e", "b"),
]
RECORDED = {
    "val retrieval R@1 (selection split)": "val/retrieval_mean_r1",
    "val negative acc. (selection split)": "val/acc",
    "val tag mAP": "val/tag_map",
    **{k: v for k, v in METRICS.items() if not k.startswith("val ")},
}
TENX = {
    "10x zero-shot top-1 (1,200 images)": "test_zeroshot/top1",
    "10x negative acc. (6,000)": "test_negatives/acc",
    "10x negative acc., other wordings": "test_negatives_reworded/acc",
}
STC_FALL = "STC term's fall in training (first to last logged step)"


def figures(root: Path, label: str, gen: int, tenx: dict) -> list[dict]:
    """Per seed: every figure of one variant (None where not measured)."""
    out = []
    for seed in SEEDS:
        run = run_dir(root, seed, label)
        metrics = state_of(run)["generations"][str(gen)]["eval"]["metrics"]
        row = {name: metrics.get(key) for name, key in RECORDED.items()}
        measured = tenx.get(clip_key(run / f"gen-{gen:03d}" / "clip" / "model"), {})
        row.update({name: measured.get(key) for name, key in TENX.items()})
        row[STC_FALL] = stc_fall(run / f"gen-{gen:03d}" / "clip" / "log.jsonl") if gen else None
        out.append(row)
    return out


def spread(values: list) -> str:
    if None in values:
        return ""
    return f"{statistics.mean(values):.3f} ± {statistics.pstdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/work/runs11"))
    ap.add_argument("--out", type=Path, default=RESULTS / "ablation_demo.md")
    args = ap.parse_args()
    cache = RESULTS / "large_heldout.json"
    tenx = json.loads(cache.read_text())["clips"] if cache.exists() else {}
    names = [*RECORDED, *TENX, STC_FALL]
    found, missing = {}, []
    for key, (_, label, gen) in VARIANTS.items():
        if all(done(run_dir(args.root, s, label), gen) for s in SEEDS):
            found[key] = figures(args.root, label, gen, tenx)
        else:
            missing.append(key)

    def table(columns: list[tuple], cell) -> list[str]:
        lines = ["| metric | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(cell(key, name) for _, key in columns) + " |")
        return lines

    def variant_cell(key: str, name: str) -> str:
        return spread([row[name] for row in found[key]])

    def contrast_cell(pair: tuple[str, str], name: str) -> str:
        v, b = pair
        vs, bs = [row[name] for row in found[v]], [row[name] for row in found[b]]
        return "" if None in vs + bs else paired(bs, vs)

    ablation = [(VARIANTS[k][0], k) for k in ABLATION if k in found]
    options = [(VARIANTS[k][0], k) for k in VARIANTS if k not in ABLATION and k in found]
    contrasts = [(what, (v, b)) for what, v, b in CONTRASTS if v in found and b in found]
    text = [
        "# The loss ablation at the demo's setting",
        "",
        f"`python benchmarks/ablation_demo.py --root {args.root}`: " + " ".join(__doc__.split("\n\n")[2].split()),
        "",
        "## The five variants (mean ± std over seeds 0-2)",
        "",
        *table(ablation, variant_cell),
        "",
        "## Paired by seed (variant vs base: means, then the difference's mean ± std, seeds up + and down -)",
        "",
        *table(contrasts, contrast_cell),
        "",
        "## The other loss options tried, over (d) (mean ± std; paired rows: `variant_<label>.md`)",
        "",
        *table(options, variant_cell),
        "",
    ]
    if missing:
        text += ["Not run yet: " + ", ".join(f"{VARIANTS[k][0]} (`{VARIANTS[k][1]}`)" for k in missing) + ".", ""]
    args.out.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
