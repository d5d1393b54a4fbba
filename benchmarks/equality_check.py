"""Does a restructuring change any number? Runs the same two jobs on this checkout and compares them with
the figures recorded from an earlier commit.

    python benchmarks/equality_check.py --record   # write benchmarks/results/equality_baseline.json
    python benchmarks/equality_check.py            # run again, compare, write equality_check.md

The jobs, both with one torch thread (float reductions depend on the thread count):
1. the whole tiny cycle (`configs/tiny.yaml`, generation 0 + 2): every numeric metric that any stage
   records in `state.json` (evaluation, annotation quality, training summaries), wall-clock figures left out,
   and each generation's last logged training step (loss terms, logit scale);
2. the first 20 training steps of `configs/emoji.yaml` generation 0, logged every step: each loss term and
   the logit scale (the run is stopped once step 20 is in its log).

Exits 1 when a figure differs, naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
BASELINE = OUT / "equality_baseline.json"
STEPS = 20
# Figures renamed on purpose since the baseline (old name -> new name): compared under the new name.
RENAMED = {"gen0/data/seed_rows": "gen0/data/teacher_rows"}
# Wall-clock figures, which no restructuring can keep equal.
TIMING = re.compile(r"(per_s|_s$|seconds|duration|time|throughput|/s$|elapsed|started|finished)")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cycle.cli", *args]


def numbers(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(numbers(v, f"{prefix}{k}/"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        key = prefix.rstrip("/")
        if not TIMING.search(key):
            out[key] = obj
    return out


def tiny_cycle(root: Path) -> dict:
    start = time.time()
    subprocess.run(
        _cli("run", str(REPO / "configs" / "tiny.yaml"), f"root={root}", "name=tiny", "cpu_threads=1"),
        check=True,
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
    )
    state = json.loads((root / "tiny" / "state.json").read_text())
    figures = {}
    for gen, stages in state["generations"].items():
        for stage, entry in stages.items():
            figures.update(numbers(entry.get("metrics", {}), f"gen{gen}/{stage}/"))
        log = Path(stages.get("train", {}).get("outputs", {}).get("log", ""))
        if log.is_file():  # the last logged training step: its loss terms and logit scale
            last = [json.loads(line) for line in log.read_text().splitlines() if '"loss"' in line][-1]
            figures.update(
                {
                    f"gen{gen}/train/last_step/{k}": v
                    for k, v in last.items()
                    if k.endswith("loss") or k in ("logit_scale", "step", "lr")
                }
            )
    return {"figures": figures, "wall_s": round(time.time() - start, 1)}


def emoji_steps(root: Path) -> dict:
    """The first STEPS logged training steps of the demo config's generation 0."""
    log = root / "emoji" / "gen-000" / "clip" / "log.jsonl"
    start = time.time()
    proc = subprocess.Popen(
        _cli(
            "run",
            str(REPO / "configs" / "emoji.yaml"),
            f"root={root}",
            "name=emoji",
            "cpu_threads=1",
            "train.log_every=1",
            "--stop-after",
            "0:train",
        ),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    steps: list[dict] = []
    try:
        while proc.poll() is None:
            if log.is_file():
                steps = [r for r in map(json.loads, log.read_text().splitlines()[:-1] or []) if "loss" in r]
                if len(steps) >= STEPS:
                    break
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if len(steps) < STEPS:
        raise SystemExit(f"the emoji run stopped after {len(steps)} steps:\n{proc.stderr.read().decode()[-2000:]}")
    keep = lambda r: {k: v for k, v in r.items() if k.endswith("loss") or k == "logit_scale" or k == "lr"}  # noqa: E731
    return {"steps": [{"step": r["step"], **keep(r)} for r in steps[:STEPS]], "wall_s": round(time.time() - start, 1)}


def run_all() -> dict:
    with tempfile.TemporaryDirectory(prefix="equality-") as tmp:
        root = Path(tmp)
        result = {"tiny_cycle": tiny_cycle(root), "emoji_gen0": emoji_steps(root)}
    result["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return result


def compare(base: dict, now: dict) -> list[str]:
    diffs = []
    a = {RENAMED.get(k, k): v for k, v in base["tiny_cycle"]["figures"].items()}
    b = now["tiny_cycle"]["figures"]
    for key in sorted(a):  # a figure added since the baseline is new, not changed (`added`)
        if key not in b:
            diffs.append(f"tiny cycle {key}: {a[key]} -> absent")
        elif not (a[key] == b[key] or (isinstance(a[key], float) and math.isnan(a[key]) and math.isnan(b[key]))):
            diffs.append(f"tiny cycle {key}: {a[key]!r} -> {b[key]!r}")
    for ra, rb in zip(base["emoji_gen0"]["steps"], now["emoji_gen0"]["steps"]):
        for key in sorted(set(ra) | set(rb)):
            if ra.get(key) != rb.get(key):
                diffs.append(f"emoji gen 0 step {ra['step']} {key}: {ra.get(key)!r} -> {rb.get(key)!r}")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help="write the baseline instead of comparing")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    now = run_all()
    if args.record:
        BASELINE.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(now['tiny_cycle']['figures'])} tiny-cycle figures and {STEPS} steps at {now['commit']}")
        return
    base = json.loads(BASELINE.read_text())
    diffs = compare(base, now)
    added = sorted(set(now["tiny_cycle"]["figures"]) - {RENAMED.get(k, k) for k in base["tiny_cycle"]["figures"]})
    lines = [
        f"# Equality check: {now['commit']} against the baseline recorded at {base['commit']}",
        "",
        "`python benchmarks/equality_check.py` (one torch thread). Figures compared exactly: "
        f"{len(base['tiny_cycle']['figures'])} metrics of the tiny cycle (generation 0 + 2, every stage), "
        f"and each loss term, the logit scale and the learning rate of the first {STEPS} steps of "
        "`configs/emoji.yaml` generation 0. Renamed on purpose (compared under the new name): "
        + ", ".join(f"`{a}` -> `{b}`" for a, b in RENAMED.items())
        + ".",
        "",
        f"Result: **{'identical' if not diffs else f'{len(diffs)} figure(s) differ'}**.",
        "",
        "| job | baseline wall s | now wall s |",
        "|---|---:|---:|",
        f"| tiny cycle | {base['tiny_cycle']['wall_s']} | {now['tiny_cycle']['wall_s']} |",
        f"| emoji gen 0, {STEPS} steps (incl. data build) | {base['emoji_gen0']['wall_s']} | "
        f"{now['emoji_gen0']['wall_s']} |",
        "",
    ]
    if diffs:
        lines += ["Differences:", "", *[f"- {d}" for d in diffs], ""]
    if added:
        groups = sorted({k.split("/")[2] if k.count("/") >= 2 else k for k in added})
        lines += [f"Figures added since the baseline (not compared): {len(added)}, in {', '.join(groups)}.", ""]
    (OUT / "equality_check.md").write_text("\n".join(lines))
    (OUT / "equality_now.json").write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
    print("\n".join(lines))
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
