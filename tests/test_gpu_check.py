"""The prepared GPU check's CPU-runnable parts: benchmarks/gpu_check.sh's arguments, benchmarks/gpu_check.py's
steps on the CPU at toy size (`--cpu-dry`), its timeout and budget handling, and benchmarks/gpu_report.py on a
sample GPU output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402


def _script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """gpu_check.sh from a copy of the repo's benchmarks/ alone: no carried .whl/ there, whatever this checkout has."""
    (tmp_path / "benchmarks").mkdir(exist_ok=True)
    shutil.copy(REPO / "benchmarks" / "gpu_check.sh", tmp_path / "benchmarks" / "gpu_check.sh")
    return subprocess.run(
        ["bash", str(tmp_path / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=60
    )


def test_gpu_check_script_refuses_bad_arguments_and_missing_wheels(tmp_path):
    for args, message in [
        (["--bogus"], "unknown argument '--bogus'"),
        (["--budget-s", "soon"], "--budget-s 'soon': expected whole seconds"),
        (["--out"], "--out needs a folder"),
        (["--cpu-dry", "--install-only"], "--cpu-dry installs nothing"),
        ([], "no carried wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh'"),
    ]:
        proc = _script(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr  # one line, no traceback
    assert "--install-only" in _script(tmp_path, "--help").stdout


@pytest.mark.slow
def test_gpu_check_cpu_dry_runs_every_step_and_writes_its_report(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    rc = gpu_check.main(["--cpu-dry", "--in-process", "--out", str(out), "--work", str(work)])
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert rc == 0, {k: v.get("error") for k, v in steps.items()}
    assert report["mode"] == "cpu-dry" and list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "ok" for s in steps.values())
    env = steps["env"]
    assert env["versions"]["torch"] and set(env["imports"].values()) == {"ok"}
    if env["versions"]["vllm"] is None:
        assert env["vllm"] == gpu_check.VLLM_WHY_NOT and steps["tput_real"]["vllm"] == gpu_check.VLLM_WHY_NOT
    for name in ("tput_demo", "tput_real"):
        spec = gpu_check.MODES["cpu-dry"][name]
        rows = steps[name]["rows"]
        assert [r["batch"] for r in rows if r["backend"] == "transformers"] == spec["batches"]
        for r in rows:  # forced length: every image gets exactly the tokens asked for
            assert r["tokens"] == r["batch"] * spec["tokens"] and r["images_per_s"] > 0
    demo = steps["demo"]
    assert [(s["gen"], s["stage"]) for s in demo["stages"]] == [
        (0, "data"),
        (0, "train"),
        (0, "eval"),
        *[(1, s) for s in ("lm", "lvlm", "align", "sft", "annotate", "train", "eval")],
    ]
    by_stage = {(s["gen"], s["stage"]): s for s in demo["stages"]}
    assert by_stage[(1, "align")]["planned_gb"] > 0 and by_stage[(0, "train")]["planned_gb"] > 0
    assert {"align/loss_before", "align/loss_after"} <= set(by_stage[(1, "align")]["metrics"])
    assert "val/retrieval_mean_r1" in by_stage[(1, "eval")]["metrics"]
    md = (out / "gpu_check.md").read_text()
    assert md == gpu_report.render(report)
    assert "A CPU dry run at toy size" in md and "| 1 | annotate |" in md and "## Annotation throughput" in md


def test_gpu_check_records_a_step_that_runs_out_of_time_and_skips_what_has_none(tmp_path):
    out = tmp_path / "out"
    argv = ["--cpu-dry", "--out", str(out), "--work", str(tmp_path / "w")]
    rc = gpu_check.main([*argv, "--steps", "env", "--step-cap-s", "0.3"])  # no interpreter imports torch in 0.3 s
    env = json.loads((out / "gpu_check.json").read_text())["steps"]["env"]
    assert rc == 1 and env["status"] == "timeout" and "stopped after 0 s" in env["error"] and "log_tail" in env
    rc = gpu_check.main([*argv, "--steps", "tput_demo,demo", "--budget-s", "1"])
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert rc == 1 and {s["status"] for s in steps.values()} == {"skipped"}
    assert "| demo | **skipped**: no time left in --budget-s |" in (out / "gpu_check.md").read_text()
    assert gpu_check.main([*argv, "--steps", "env,warp"]) == 2


SAMPLE = {
    "mode": "gpu",
    "started": "2026-12-01 10:00:00 UTC",
    "steps": {
        "env": {
            "status": "ok",
            "wall_s": 9.0,
            "versions": {"torch": "2.11.0", "transformers": "5.17.0", "vllm": "0.33.0"},
            "imports": {"open_clip": "ok", "lance": "ok"},
            "gpu": {"name": "NVIDIA H200", "memory_gb": 150.0, "count": 1},
            "bf16": True,
            "vllm": "importable",
        },
        "tput_real": {
            "status": "ok",
            "wall_s": 80.0,
            "model": "ViT-B-16 tower + Qwen/Qwen2.5-1.5B-Instruct-shaped LM",
            "params_m": 1633.1,
            "dtype": "bfloat16",
            "image_tokens": 197,
            "tokens_per_image": 448,
            "build_s": 20.0,
            "rows": [
                {"backend": "transformers", "batch": 32, "images": 32, "tokens": 14336, "seconds": 16.0}
                | {"images_per_s": 2.0, "tokens_per_s": 896.0, "peak_allocated_gb": 9.5},
                {"backend": "transformers", "batch": 128, "images": 128, "tokens": 57344, "seconds": 32.0}
                | {"images_per_s": 4.0, "tokens_per_s": 1792.0, "peak_allocated_gb": 21.0},
                {"backend": "vllm", "batch": 128, "images": 128, "tokens": 57344, "seconds": 5.0}
                | {"images_per_s": 25.6, "tokens_per_s": 11468.8},
            ],
        },
        "demo": {
            "status": "ok",
            "wall_s": 150.0,
            "config": "emoji",
            "overrides": ["device=cuda", "cycle.generations=1"],
            "stages": [
                {"gen": 0, "stage": "train", "seconds": 60.0, "peak_allocated_gb": 1.2, "peak_reserved_gb": 1.5}
                | {"planned_gb": 0.9, "metrics": {}},
                {"gen": 1, "stage": "align", "seconds": 70.0, "peak_allocated_gb": 0.4, "peak_reserved_gb": 0.6}
                | {"planned_gb": 0.3, "metrics": {"align/loss_before": 5.0, "align/loss_after": 2.5}},
            ],
        },
        "tput_demo": {"status": "failed", "wall_s": 3.0, "error": "RuntimeError: boom", "log_tail": "Traceback\nboom"},
    },
}


def test_gpu_report_renders_a_gpu_output_with_its_targets(tmp_path):
    md = gpu_report.render(SAMPLE)
    assert md.startswith("# GPU check (gpu), 2026-12-01 10:00:00 UTC")
    assert "- GPU: NVIDIA H200, 150 GB" in md and "A CPU dry run" not in md
    assert "| transformers | 128 | 128 | 57344 | 32.00 | 4.00 | 1792 | 21.00 |" in md
    assert "vLLM / transformers (best batch of each): **6.4x** (target >= 5x: met)." in md
    assert "Total **130 s** over 2 stages (target < 180 s: met)." in md
    assert "| 1 | align | 70.0 | 0.40 | 0.60 | 0.30 | align/loss_before 5, align/loss_after 2.5 |" in md
    assert "| tput_demo | **failed**: RuntimeError: boom |" in md and "## tput_demo: end of its log" in md
    slow = json.loads(json.dumps(SAMPLE))
    slow["steps"]["tput_real"]["rows"][2]["images_per_s"] = 8.0
    slow["steps"]["demo"]["stages"][0]["seconds"] = 200.0
    md = gpu_report.render(slow)
    assert "**2.0x** (target >= 5x: NOT met)" in md and "(target < 180 s: NOT met)" in md

    source = tmp_path / "gpu_check.json"
    source.write_text(json.dumps(SAMPLE))
    out = tmp_path / "results" / "gpu_check.md"
    assert gpu_report.main([str(source), "--out", str(out)]) == 0
    assert out.read_text() == gpu_report.render(SAMPLE)
    assert json.loads(out.with_suffix(".json").read_text()) == SAMPLE
    (tmp_path / "bad.json").write_text("{}")
    assert gpu_report.main([str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert gpu_report.main([str(tmp_path / "none.json"), "--out", str(out)]) == 2
