"""Render the GPU check's output (`gpu_check.json`, written by benchmarks/gpu_check.py) as markdown.

    python benchmarks/gpu_report.py PATH/gpu_check.json [--out benchmarks/results/gpu_check.md]

The JSON is copied beside the markdown (benchmarks/results/gpu_check.json) so the figures stay readable
by scripts. Targets of issue 11 are checked here: gen 0 + 1 on CUDA under 3 minutes, vLLM >= 5x batched
transformers on the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_TARGET_S = 180.0  # issue 11: the demo's generation 0 + 1 on CUDA under 3 minutes
VLLM_TARGET_X = 5.0  # issue 11: vLLM annotation >= 5x transformers batched on the same model


def _gb(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _status(record: dict) -> str:
    status = record.get("status", "missing")
    return status if status == "ok" else f"**{status}**: {record.get('error', '')}".strip()


def _env(record: dict) -> list[str]:
    lines = ["## Machine and packages", ""]
    gpu = record.get("gpu")
    lines.append(f"- GPU: {gpu['name']}, {gpu['memory_gb']:.0f} GB" if gpu else "- GPU: none (CPU run)")
    if "bf16" in record:
        lines.append(f"- bf16 supported: {record['bf16']}")
    found = record.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in found.items() if v))
    missing = [k for k, v in found.items() if not v]
    if missing:
        lines.append("- not installed: " + ", ".join(missing))
    failed = {k: v for k, v in (record.get("imports") or {}).items() if v != "ok"}
    lines.append("- imports: " + ("all ok" if not failed else "; ".join(f"{k}: {v}" for k, v in failed.items())))
    if "emoji_font" in record:
        lines.append(f"- emoji font: {record['emoji_font']}; Pillow RAQM layout: {record.get('pillow_raqm')}")
    if record.get("vllm"):
        lines.append(f"- vLLM: {record['vllm']}")
    return lines + [""]


def _demo(record: dict) -> list[str]:
    lines = [f"## The demo's generation 0 + 1 (`configs/{record.get('config', 'emoji')}.yaml`)", ""]
    if record.get("overrides"):
        lines.append("Overrides: `" + " ".join(record["overrides"]) + "`.")
    stages = record.get("stages") or []
    if stages:
        total = sum(s["seconds"] for s in stages)
        complete = record.get("status") == "ok"
        verdict = ""
        if complete:
            verdict = f" (target < {DEMO_TARGET_S:.0f} s: {'met' if total < DEMO_TARGET_S else 'NOT met'})"
        lines += [f"Total **{total:.0f} s** over {len(stages)} stages{verdict}.", ""]
        lines += [
            "| gen | stage | seconds | peak allocated GB | peak reserved GB | dry-run estimate GB | metrics |",
            "|---:|---|---:|---:|---:|---:|---|",
        ]
        for s in stages:
            metrics = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.get("metrics", {}).items()
            )
            lines.append(
                f"| {s['gen']} | {s['stage']} | {s['seconds']:.1f} | {_gb(s.get('peak_allocated_gb'))} | "
                f"{_gb(s.get('peak_reserved_gb'))} | {_gb(s.get('planned_gb'))} | {metrics} |"
            )
    return lines + [""]


def _throughput(title: str, record: dict) -> tuple[list[str], dict]:
    lines = [f"## Annotation throughput: {title}", ""]
    if record.get("model"):
        lines.append(
            f"{record['model']}: {record['params_m']:.1f}M parameters, {record['dtype']}, "
            f"{record['image_tokens']} image tokens, {record['tokens_per_image']} tokens generated per image (forced)."
            + (f" Built in {record['build_s']:.0f} s." if "build_s" in record else "")
        )
        lines.append("")
    rows = record.get("rows") or []
    best: dict[str, float] = {}
    if rows:
        lines += ["| backend | batch | images | tokens | seconds | images/s | tokens/s | peak allocated GB |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['backend']} | {r['batch']} | {r['images']} | {r['tokens']} | {r['seconds']:.2f} | "
                f"{r['images_per_s']:.2f} | {r['tokens_per_s']:.0f} | {_gb(r.get('peak_allocated_gb'))} |"
            )
            best[r["backend"]] = max(best.get(r["backend"], 0.0), r["images_per_s"])
        lines.append("")
    if "transformers" in best and "vllm" in best:
        ratio = best["vllm"] / best["transformers"]
        met = "met" if ratio >= VLLM_TARGET_X else "NOT met"
        lines.append(
            f"vLLM / transformers (best batch of each): **{ratio:.1f}x** (target >= {VLLM_TARGET_X:.0f}x: {met})."
        )
    elif record.get("vllm"):
        lines.append(f"vLLM: {record['vllm']}.")
    return lines + [""], best


def render(report: dict) -> str:
    """The markdown for one gpu_check.json."""
    steps = report.get("steps", {})
    mode = report.get("mode", "?")
    lines = [
        f"# GPU check ({mode}), {report.get('started', '')}",
        "",
        "Written by `benchmarks/gpu_check.sh` (`benchmarks/gpu_check.py`), rendered by `benchmarks/gpu_report.py`."
        + (" A CPU dry run at toy size: no figure here is a GPU figure." if mode != "gpu" else ""),
        "",
        "| step | status | wall s |",
        "|---|---|---:|",
    ]
    for name, record in steps.items():
        lines.append(f"| {name} | {_status(record)[:200]} | {record.get('wall_s', 0):.0f} |")
    lines.append("")
    if "env" in steps:
        lines += _env(steps["env"])
    for name, title in (("tput_demo", "the demo's LLaVA"), ("tput_real", "a real-vitb16-sized LLaVA")):
        if name in steps:
            lines += _throughput(title, steps[name])[0]
    if "demo" in steps:
        lines += _demo(steps["demo"])
    for name, record in steps.items():
        if record.get("status") not in ("ok", "skipped") and record.get("log_tail"):
            lines += [f"## {name}: end of its log", "", "```", record["log_tail"][-1500:].rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="gpu_check.json from a GPU check's output folder")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.md"))
    args = ap.parse_args(argv)
    source = Path(args.json)
    try:
        report = json.loads(source.read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read {source}: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or "steps" not in report:
        print(f"error: {source} is not a gpu_check.json (no 'steps')", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
