"""The demo's results over several seeds: held-out metrics per generation, mean and spread.

    python benchmarks/demo_seeds.py --seeds 0,1,2 [--parallel 1] [--root DIR] [key=value ...]
    python benchmarks/demo_seeds.py --report-only [--root DIR]   # rewrite the report from demo_seeds.json
    python benchmarks/demo_seeds.py --variant LABEL [--seeds 0,1,2] [--root DIR]

Runs `hqclip run configs/emoji.yaml name=demo-seed-S seed=S train.seed=S` for each seed as its own
process under `/usr/bin/time -v` (wall time and peak memory of the whole cycle), then writes
`benchmarks/results/demo_seeds.md` (a table per metric: generation x mean ± std over seeds, plus each
seed's wall time, peak RSS and annotation quality: over every training image and over the images never
used in SFT, next to the alt-text's) and `benchmarks/results/demo_seeds.png`; `demo_seeds.json` keeps each
seed's wall time, peak memory and run folder, so `--report-only` rewrites the report from the run states.
The dataset is the same build for every seed (`data.emoji.seed` is not varied): seeds vary model
initialisation, data order, text draws and annotation retries. A resumed run is reused as it is.
`--variant LABEL` writes the same report (`demo_seeds_<label>.md`, `.png`) over the runs
`demo-seed-S-<label>` of `benchmarks/demo_variant.py`: every generation as that run holds it (the ones before
its fork are the demo runs' own), so a variant that became the shipped config is reported whole.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
METRICS = {
    "zero-shot top-1": "test_zeroshot/top1",
    "retrieval R@1 (mean of both directions)": "test_retrieval/retrieval_mean_r1",
    "negative discrimination acc.": "test_negatives/acc",
    "retrieval R@1, other wordings": "test_retrieval_reworded/retrieval_mean_r1",  # not the teacher's template
    "negative discrimination acc., other wordings": "test_negatives_reworded/acc",
    "compositional retrieval R@1": "test_compositional/retrieval_mean_r1",
    "compositional retrieval R@1, other wordings": "test_compositional_reworded/retrieval_mean_r1",
    "val retrieval R@1 (selection split)": "val/retrieval_mean_r1",
}


def run_seed(seed: int, root: Path, overrides: list[str], threads: int = 0) -> dict:
    name = f"demo-seed-{seed}"
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "cycle.cli",
        "run",
        str(REPO / "configs" / "emoji.yaml"),
        f"root={root}",
        f"name={name}",
        f"seed={seed}",
        f"train.seed={seed}",
        *([f"cpu_threads={threads}"] if threads else []),
        *overrides,
    ]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    state = json.loads((root / name / "state.json").read_text())
    return {"seed": seed, "wall_s": wall, "peak_gb": peak_kb / 2**20, "run_dir": str(root / name), "state": state}


def finished_generations(results: list[dict]) -> list[int]:
    """The generations every seed's run has evaluated (a stopped run reports what it finished)."""
    return sorted(
        int(g)
        for g in results[0]["state"]["generations"]
        if all(r["state"]["generations"].get(g, {}).get("eval", {}).get("status") == "done" for r in results)
    )


def eval_metric(result: dict, gen: int, key: str) -> float | None:
    """One seed's evaluation figure `key` of generation `gen` (None where it was not measured)."""
    return result["state"]["generations"][str(gen)]["eval"]["metrics"].get(key)


def paired(base: list[float], variant: list[float]) -> str:
    diffs = [v - b for b, v in zip(base, variant)]
    return (
        f"{statistics.mean(variant):.3f} vs {statistics.mean(base):.3f}: "
        f"{statistics.mean(diffs):+.3f} ± {statistics.pstdev(diffs):.3f} "
        f"({sum(d > 0 for d in diffs)}+ {sum(d < 0 for d in diffs)}-)"
    )


def summarise(results: list[dict]) -> str:
    gens = finished_generations(results)
    lines = [
        "# Demo results over seeds",
        "",
        f"`configs/emoji.yaml`, seeds {', '.join(str(r['seed']) for r in results)}; mean ± std over seeds "
        "(population std). Held-out sets are never used for tuning; `val` is the selection split.",
        "",
    ]
    header = "| metric | " + " | ".join(f"gen {g}" for g in gens) + " |"
    lines += [header, "|---|" + "---:|" * len(gens)]
    for label, key in METRICS.items():
        cells = []
        for g in gens:
            vals = [eval_metric(r, g, key) for r in results]
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *step_table(results, gens), "", *annotator_table(results, gens)]
    return "\n".join(lines) + "\n"


def step_table(results: list[dict], gens: list[int]) -> list[str]:
    """Each generation against the one before, paired by seed: mean ± std of the difference, seeds up/down."""
    if len(gens) < 2:
        return []
    lines = [
        "Each generation against the one before, paired by seed (mean of the later vs the earlier: mean ± std of "
        "the difference, seeds up +, down -):",
        "",
        "| metric | " + " | ".join(f"gen {g} vs {g - 1}" for g in gens[1:]) + " |",
        "|---|" + "---|" * (len(gens) - 1),
    ]
    for label, key in METRICS.items():
        cells = []
        for g in gens[1:]:
            pairs = [(eval_metric(r, g - 1, key), eval_metric(r, g, key)) for r in results]
            pairs = [p for p in pairs if None not in p]
            cells.append(paired([a for a, _ in pairs], [b for _, b in pairs]) if pairs else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def annotator_table(results: list[dict], gens: list[int]) -> list[str]:
    """Per seed: wall, peak, and each generation's annotator fact-F1 vs the alt-text it read (all training
    images, and the images never used in SFT), plus how many seeds beat the alt-text on unseen images."""
    nan = float("nan")
    lines = [
        "| seed | wall (min) | peak RSS (GB) | "
        + " | ".join(
            f"gen {g} annot. / alt-text F1 (all) | gen {g} unseen: annot. / alt-text F1 | gen {g} valid"
            for g in gens[1:]
        )
        + " |",
        "|---:|---:|---:|" + "---|---|---:|" * (len(gens) - 1),
    ]
    above = {g: 0 for g in gens[1:]}
    for r in results:
        cells = []
        for g in gens[1:]:
            m = r["state"]["generations"][str(g)]["annotate"]["metrics"]
            unseen = m.get("quality/unseen/annotation_f1", nan), m.get("quality/unseen/alt_text_f1", nan)
            above[g] += unseen[0] > unseen[1]
            cells += [
                f"{m.get('quality/annotation/f1', nan):.3f} / {m.get('quality/alt_text/f1', nan):.3f}",
                f"{unseen[0]:.3f} / {unseen[1]:.3f}",
                f"{m.get('quality/schema_valid_share', nan):.2f}",
            ]
        wall = f"{r['wall_s'] / 60:.1f} | {r['peak_gb']:.2f}" if r.get("wall_s") else "not timed | not timed"
        lines.append(f"| {r['seed']} | {wall} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Seeds whose annotator beats the alt-text on the images never used in SFT: "
        + ", ".join(f"gen {g}: {n}/{len(results)}" for g, n in above.items())
        + ".",
    ]
    for g in gens[2:]:  # annotator g vs g-1, paired by seed
        diffs = [
            r["state"]["generations"][str(g)]["annotate"]["metrics"].get("quality/unseen/annotation_f1", nan)
            - r["state"]["generations"][str(g - 1)]["annotate"]["metrics"].get("quality/unseen/annotation_f1", nan)
            for r in results
        ]
        lines.append(
            f"Annotator {g} - annotator {g - 1}, unseen fact-F1 (paired by seed): "
            f"{statistics.mean(diffs):+.3f} ± {statistics.pstdev(diffs):.3f}, "
            f"higher in {sum(d > 0 for d in diffs)}/{len(diffs)} seeds."
        )
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = finished_generations(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, key in METRICS.items():
        means, stds = [], []
        for g in gens:
            vals = [r["state"]["generations"][str(g)]["eval"]["metrics"].get(key, float("nan")) for r in results]
            means.append(statistics.mean(vals))
            stds.append(statistics.pstdev(vals))
        ax.errorbar(gens, means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xticks(gens)
    ax.set_xlabel("generation")
    ax.set_ylabel("held-out metric")
    ax.set_title(f"emoji demo, mean ± std over {len(results)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=1, help="seeds run at once (timings are only clean at 1)")
    ap.add_argument("--root", default=str(REPO / "generations"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from demo_seeds.json")
    ap.add_argument("--variant", default="", help="report the runs demo-seed-S-<label> of demo_variant.py")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    timings = OUT / "demo_seeds.json"
    if args.variant:
        dirs = [Path(args.root) / f"demo-seed-{s}-{args.variant}" for s in args.seeds.split(",")]
        results = [
            {"seed": int(s), "run_dir": str(d), "state": json.loads((d / "state.json").read_text())}
            for s, d in zip(args.seeds.split(","), dirs)
        ]
        text = summarise(results).replace(
            "`configs/emoji.yaml`,",
            f"`configs/emoji.yaml` as forked by `demo_variant.py --label {args.variant}` "
            f"(runs `demo-seed-S-{args.variant}`; generations before the fork are the demo runs' own),",
            1,
        )
        (OUT / f"demo_seeds_{args.variant}.md").write_text(text)
        plot(results, OUT / f"demo_seeds_{args.variant}.png")
        print(text)
        return
    if args.report_only:
        kept = json.loads(timings.read_text())
        results = [{**k, "state": json.loads((Path(k["run_dir"]) / "state.json").read_text())} for k in kept["seeds"]]
        parallel = kept["parallel"]
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
        # seeds sharing the cores get one torch thread each: two threads per process on contended cores spin-wait
        threads = 1 if args.parallel > 1 else 0
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda s: run_seed(s, Path(args.root), args.overrides, threads), seeds))
        parallel = args.parallel
        OUT.mkdir(parents=True, exist_ok=True)
        seeds_kept = [
            {"seed": r["seed"], "wall_s": r["wall_s"], "peak_gb": r["peak_gb"], "run_dir": r["run_dir"]}
            for r in results
        ]
        timings.write_text(
            json.dumps({"parallel": parallel, "overrides": args.overrides, "seeds": seeds_kept}, indent=1)
        )
    text = summarise(results)
    if args.report_only and kept.get("note"):  # what happened to these runs, kept beside their timings
        text += f"\n{kept['note']}\n"
    if parallel > 1:
        text += f"\nWall times were taken with {parallel} seeds running at once on the same cores.\n"
    (OUT / "demo_seeds.md").write_text(text)
    plot(results, OUT / "demo_seeds.png")
    print(text)


if __name__ == "__main__":
    main()
