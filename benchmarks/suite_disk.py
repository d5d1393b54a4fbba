"""How much disk the test suite takes: the free-space floor `scripts/bootstrap.sh test` asks for.

    python benchmarks/suite_disk.py [--out benchmarks/results/suite_disk.md]

Runs `.ci/run` (the README's test command) with TMPDIR set to a fresh folder, samples that folder's size
(`du`) every few seconds, and writes the peak, what is left after the run (pytest keeps failed tests' folders
only: bootstrap passes `tmp_path_retention_policy=failed`), the exit status and the wall time. CI once ran on
a full disk and errored test after test for 90 minutes; bootstrap now refuses to start below its floor.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True).stdout.split()
    return int(out[0]) * 1024 if out else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "suite_disk.md")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="suite-disk-"))
    env = {**os.environ, "TMPDIR": str(tmp), "CI": "true"}
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(args.every):
            peak[0] = max(peak[0], du_bytes(tmp))

    sampler = threading.Thread(target=sample, daemon=True)
    start = time.time()
    sampler.start()
    proc = subprocess.run(["bash", ".ci/run"], cwd=REPO, env=env, capture_output=True, text=True)
    done.set()
    sampler.join()
    wall = time.time() - start
    left = du_bytes(tmp)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    lines = [
        "# Disk the test suite takes",
        "",
        f"`python benchmarks/suite_disk.py` at {commit.stdout.strip()}: `.ci/run` with TMPDIR in a fresh folder, "
        f"its size sampled every {args.every:g} s.",
        "",
        "| | |",
        "|---|---:|",
        f"| exit status | {proc.returncode} |",
        f"| pytest's last line | {summary} |",
        f"| wall | {wall / 60:.1f} min |",
        f"| peak size under TMPDIR | {peak[0] / GIB:.2f} GiB |",
        f"| left after the run | {left / GIB:.2f} GiB |",
    ]
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    lines += ["", "Failed:", "", *[f"- `{line}`" for line in failed]] if failed else []
    args.out.write_text("\n".join(lines) + "\n")
    print(proc.stdout[-20000:], proc.stderr[-5000:], "\n".join(lines), sep="\n")
    subprocess.run(["rm", "-rf", str(tmp)])
    raise SystemExit(proc.returncode)


if __name__ == "__main__":
    main()
