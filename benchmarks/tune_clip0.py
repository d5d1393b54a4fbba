"""Tune generation 0's CLIP (trained on raw alt-text) on the VALIDATION split: one setting per call.

Runs the real pipeline (`hqclip run configs/emoji.yaml ... --stop-after 0:eval`) with the overrides given,
in its own run directory under --root, and appends one JSON line (label, overrides, val metrics, wall
seconds) to <root>/results.jsonl. --table prints the markdown table of every line so far. Only `val/*`
metrics are recorded: held-out splits are never looked at while tuning.

    python benchmarks/tune_clip0.py --label lr2e-3 -- train.lr=2e-3
    python benchmarks/tune_clip0.py --table
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "emoji.yaml"
COLUMNS = ("val/retrieval_mean_r1", "val/acc_object", "val/acc_count", "val/acc_relation", "val/acc")


def run_one(root: Path, label: str, overrides: list[str]) -> dict:
    start = time.time()
    cmd = [
        sys.executable,
        "-m",
        "cycle.cli",
        "run",
        str(CONFIG),
        f"root={root}",
        f"name={label}",
        *overrides,
        "--stop-after",
        "0:eval",
    ]
    subprocess.run(cmd, check=True)
    metrics = json.loads((root / label / "gen-000" / "eval" / "metrics.json").read_text())
    return {
        "label": label,
        "overrides": overrides,
        "wall_s": round(time.time() - start, 1),
        **{k: v for k, v in metrics.items() if k.startswith("val/")},
    }


def table(root: Path) -> str:
    rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    head = "| setting | overrides | " + " | ".join(COLUMNS) + " | wall s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for r in rows:
        vals = " | ".join(f"{r.get(c, float('nan')):.3f}" for c in COLUMNS)
        lines.append(f"| {r['label']} | `{' '.join(r['overrides'])}` | {vals} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("generations/tune-clip0"))
    ap.add_argument("--label")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.table:
        print(table(args.root))
        return
    args.root.mkdir(parents=True, exist_ok=True)
    result = run_one(args.root, args.label, args.overrides)
    with open(args.root / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
