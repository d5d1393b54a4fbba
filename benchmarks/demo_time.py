"""The demo's cost alone on this machine: wall time and peak memory of `hqclip run configs/emoji.yaml`
(what `bash scripts/bootstrap.sh demo` runs before its status table and report), and each stage's time.

    python benchmarks/demo_time.py [--root /tmp/demo-time]    # ~22 minutes on 2 cores; nothing else running

Writes benchmarks/results/demo_time.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/demo-time")
    args = ap.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cycle.cli", "run", "configs/emoji.yaml", f"root={root}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    state = json.loads((root / "emoji-demo" / "state.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [
        f"# The demo alone: `hqclip run configs/emoji.yaml` at {commit.stdout.strip()}",
        "",
        f"Wall time **{wall}**, peak resident memory **{peak_kb / 2**20:.2f} GiB** (`/usr/bin/time -v`).",
        "",
        "| generation | " + " | ".join(["data", "lm", "lvlm", "align", "sft", "annotate", "train", "eval"]) + " |",
        "|---|" + "---:|" * 8,
    ]
    for gen, stages in sorted(state["generations"].items(), key=lambda kv: int(kv[0])):
        cells = [
            f"{stages[s]['duration_s']:.0f} s" if s in stages else ""
            for s in ["data", "lm", "lvlm", "align", "sft", "annotate", "train", "eval"]
        ]
        lines.append(f"| {gen} | " + " | ".join(cells) + " |")
    out = REPO / "benchmarks" / "results" / "demo_time.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
