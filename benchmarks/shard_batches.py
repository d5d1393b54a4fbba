"""What does reading per-rank shards cost? Generation 0 of a config trained on 1 rank and on 2 spawned ranks.

Since issue 12 each rank reads only its own contiguous shard of the train rows, so the global batches of a
2-rank run (half from each shard) differ from the 1-rank run's (one permutation of all rows); before, the
two runs trained on the same batches and ended within 1e-4 of each other. So the difference between the two
columns here is the cost (or not) of the sharded batches. Val metrics only (nothing held out is looked at).

    python benchmarks/shard_batches.py [--config configs/tiny.yaml] [--seeds 0 1 2] [-- key=value ...]

The seeds are `train.seed` (the data stay the same); overrides after `--` go to every run.

Writes benchmarks/results/shard_batches.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
METRICS = ("val/retrieval_mean_r1", "val/acc")


def run(config: Path, root: Path, seed: int, world_size: int, overrides: list[str]) -> dict:
    name = f"seed{seed}-w{world_size}"
    cmd = [sys.executable, "-m", "cycle.cli", "run", str(config), f"root={root}", f"name={name}", *overrides]
    cmd += [f"train.seed={seed}", f"train.world_size={world_size}", "--stop-after", "0:eval"]
    subprocess.run(cmd, check=True, env=subprocess_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    metrics = json.loads((root / name / "gen-000" / "eval" / "metrics.json").read_text())
    return {k: metrics[k] for k in METRICS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="shard-batches-") as tmp:
        for seed in args.seeds:
            row = {"seed": seed}
            for world_size in (1, 2):
                row[f"w{world_size}"] = run(args.config, Path(tmp), seed, world_size, args.overrides)
                print(seed, world_size, row[f"w{world_size}"], flush=True)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"config": str(args.config.relative_to(REPO)), "overrides": args.overrides, "rows": rows}
    (OUT / "shard_batches.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Generation 0 on 1 rank vs 2 ranks reading their own shards (`{result['config']}` "
        f"`{' '.join(args.overrides)}`, seeds = train.seed)",
        "",
        "| seed | " + " | ".join(f"{m} 1 rank | {m} 2 ranks" for m in METRICS) + " |",
        "|---:|" + "---:|" * (2 * len(METRICS)),
    ]
    for r in rows:
        cells = " | ".join(f"{r['w1'][m]:.3f} | {r['w2'][m]:.3f}" for m in METRICS)
        lines.append(f"| {r['seed']} | {cells} |")
    means = " | ".join(
        f"{statistics.mean(r['w1'][m] for r in rows):.3f} | {statistics.mean(r['w2'][m] for r in rows):.3f}"
        for m in METRICS
    )
    lines.append(f"| mean | {means} |")
    (OUT / "shard_batches.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
