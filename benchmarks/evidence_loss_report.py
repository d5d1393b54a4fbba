"""The variants and metrics of the loss ablation (`evidence_loss.py`), and its markdown report.

Pure functions of the runs' `result.json` contents: mean ± sample std per variant over seeds, and paired
differences (same seed: same initial CLIP weights, batch order and crops) between variants that differ
in one thing.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    teacher: bool  # train on the teacher annotations (generation 1); False: raw alt-text only
    hni: bool
    stc: bool


VARIANTS = (
    Variant("a", "alt-text only", False, False, False),
    Variant("b", "teacher, L_clip", True, False, False),
    Variant("c", "teacher, L_clip + HNI", True, True, False),
    Variant("d", "teacher, L_clip + STC", True, False, True),
    Variant("e", "teacher, all (HNI + STC)", True, True, True),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}

# (metric key, column title): what the issue asks for, held-out first, val last.
METRICS = (
    ("test_zeroshot/top1", "zero-shot top-1"),
    ("test_retrieval/retrieval_mean_r1", "retrieval R@1"),
    ("test_negatives/acc", "neg. acc"),
    ("test_negatives/acc_object", "neg. object"),
    ("test_negatives/acc_relation", "neg. relation"),
    ("test_negatives/acc_count", "neg. count"),
    ("test_compositional/retrieval_mean_r1", "compositional R@1"),
    ("val/retrieval_mean_r1", "val R@1"),
    ("val/acc", "val neg. acc"),
)

# (variant, against): what one change does — the teacher's text, then each term on top of L_clip.
COMPARISONS = (("b", "a"), ("c", "b"), ("d", "b"), ("e", "b"), ("e", "c"))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is nan for a single value."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(results: Sequence[dict]) -> dict[str, dict]:
    """Per variant: seeds, (mean, std) of each metric, mean train / eval seconds."""
    out: dict[str, dict] = {}
    for v in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == v.key), key=lambda r: r["seed"])
        if not runs:
            continue
        row = {
            "seeds": [r["seed"] for r in runs],
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "eval_s": statistics.fmean(r["eval_s"] for r in runs),
        }
        for key, _ in METRICS:
            row[key] = mean_std([r["metrics"][key] for r in runs if key in r["metrics"]])
        out[v.key] = row
    return out


def paired_differences(results: Sequence[dict], variant: str, against: str) -> dict[str, tuple]:
    """Per metric: (mean, std, ups, downs) of `variant` minus `against` over the seeds both have."""
    by_run = {(r["variant"], r["seed"]): r["metrics"] for r in results}
    seeds = sorted(s for v, s in by_run if v == variant and (against, s) in by_run)
    out = {}
    for key, _ in METRICS:
        diffs = [by_run[(variant, s)][key] - by_run[(against, s)][key] for s in seeds]
        out[key] = (*mean_std(diffs), sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
    return out


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _diff_cell(mean: float, std: float, ups: int, downs: int) -> str:
    if math.isnan(mean):
        return "n/a"
    spread = "" if math.isnan(std) else f" ± {std:.3f}"
    return f"{mean:+.3f}{spread} ({ups}+ {downs}-)"


def markdown_report(
    sections: dict, pins: dict, results: Sequence[dict], wall_s: float, threads: int = 0, command: str = ""
) -> str:
    """The whole report; `sections` is the config shared by every run (plain dicts, shown as JSON)."""
    summary = summarise(results)
    lines = ["# Loss ablation on emoji scenes (issue 3)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    seeds = sorted({r["seed"] for r in results})
    lines += [
        f"Mean ± sample std over seeds {', '.join(map(str, seeds))} (seed = `seed` = `train.seed`; one "
        f"dataset build). {pins['n_train']} training scenes, every one with a teacher annotation "
        f"(samples@v{pins['samples_version']}, annotations@v{pins['annotations_version']} = gen-001). "
        f"Training + evaluation summed over the {len(results)} runs: "
        f"{sum(r['train_s'] + r['eval_s'] for r in results) / 60:.1f} min on {threads or 'default'} torch "
        f"thread(s); wall time of the call that wrote this report: {wall_s / 60:.1f} min (finished runs are "
        "reused, not redone).",
        "",
    ]
    head = ["variant", *[title for _, title in METRICS], "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in VARIANTS:
        if v.key in summary:
            row = summary[v.key]
            lines.append(
                f"| ({v.key}) {v.label} | "
                + " | ".join(_cell(*row[k]) for k, _ in METRICS)
                + f" | {row['train_s']:.0f} |"
            )
    pairs = [(v, a) for v, a in COMPARISONS if v in summary and a in summary]
    if pairs:
        lines += [
            "",
            "Paired differences (same seed on both sides: same initial weights, batches and crops): mean ± "
            "std of the difference, and on how many seeds it was positive (+) and negative (-):",
            "",
            "| change | " + " | ".join(t for _, t in METRICS) + " |",
            "|---|" + "---|" * len(METRICS),
        ]
        for v, a in pairs:
            diff = paired_differences(results, v, a)
            lines.append(f"| ({v}) - ({a}) | " + " | ".join(_diff_cell(*diff[k]) for k, _ in METRICS) + " |")
    lines += [
        "",
        "Per seed:",
        "",
        "| variant | seed | " + " | ".join(t for _, t in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        lines.append(
            f"| ({r['variant']}) | {r['seed']} | "
            + " | ".join(f"{r['metrics'].get(k, math.nan):.3f}" for k, _ in METRICS)
            + " |"
        )
    lines += [
        "",
        "Config shared by every run (a variant sets `loss.hni_weight` / `loss.stc_weight` to 0 for the "
        "terms it leaves out; (a) trains with `generation=None`, which turns both off):",
        "",
        "```json",
        json.dumps(sections, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)
