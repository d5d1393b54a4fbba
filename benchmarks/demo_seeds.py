"""The demo's results over several seeds: held-out metrics per generation, mean and spread.

    python benchmarks/demo_seeds.py --seeds 0,1,2 [--parallel 1] [key=value ...]

Runs `hqclip run configs/emoji.yaml name=demo-seed-S seed=S train.seed=S` for each seed as its own
process under `/usr/bin/time -v` (wall time and peak memory of the whole cycle), then writes
`benchmarks/results/demo_seeds.md` (a table per metric: generation x mean ± std over seeds, plus each
seed's wall time, peak RSS and annotation quality) and `benchmarks/results/demo_seeds.png`.
The dataset is the same build for every seed (`data.emoji.seed` is not varied): seeds vary model
initialisation, data order, text draws and annotation retries. A resumed run is reused as it is.
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
    return {"seed": seed, "wall_s": wall, "peak_gb": peak_kb / 2**20, "state": state}


def summarise(results: list[dict]) -> str:
    gens = sorted(int(g) for g in results[0]["state"]["generations"])
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
            vals = [r["state"]["generations"][str(g)]["eval"]["metrics"].get(key) for r in results]
            vals = [v for v in vals if v is not None]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if vals else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| seed | wall (min) | peak RSS (GB) | "
        + " | ".join(f"gen {g} annot. F1 / alt-text F1 / valid" for g in gens if g > 0)
        + " |",
        "|---:|---:|---:|" + "---|" * (len(gens) - 1),
    ]
    for r in results:
        cells = []
        for g in gens[1:]:
            m = r["state"]["generations"][str(g)]["annotate"]["metrics"]
            cells.append(
                f"{m.get('quality/annotation/f1', float('nan')):.3f} / "
                f"{m.get('quality/alt_text/f1', float('nan')):.3f} / "
                f"{m.get('quality/schema_valid_share', float('nan')):.2f}"
            )
        lines.append(f"| {r['seed']} | {r['wall_s'] / 60:.1f} | {r['peak_gb']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = sorted(int(g) for g in results[0]["state"]["generations"])
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
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    # seeds sharing the cores get one torch thread each: two threads per process on contended cores spin-wait
    threads = 1 if args.parallel > 1 else 0
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda s: run_seed(s, Path(args.root), args.overrides, threads), seeds))
    OUT.mkdir(parents=True, exist_ok=True)
    text = summarise(results)
    if args.parallel > 1:
        text += f"\nWall times were taken with {args.parallel} seeds running at once on the same cores.\n"
    (OUT / "demo_seeds.md").write_text(text)
    plot(results, OUT / "demo_seeds.png")
    print(text)


if __name__ == "__main__":
    main()
