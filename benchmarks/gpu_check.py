"""The prepared GPU check of issue 11, run once by `benchmarks/gpu_check.sh` on a lent H100/H200 (no network).

Steps, each in its own process with a timeout (a hang or a crash loses that step only, and each step starts
from an empty GPU), all within `--budget-s`:

- env: versions of everything the cycle imports, the GPU, whether vLLM can be imported;
- tput_demo / tput_real: annotation throughput of the transformers backend, batched, every output forced to
  the same length (min_new_tokens = max_new_tokens), on a LLaVA of the demo's size and on one of
  `configs/real-vitb16.yaml`'s size (ViT-B-16 tower, a Qwen2.5-1.5B-shaped LM; random weights and a
  synthetic word-level tokenizer of the real vocabulary size: the arithmetic of a real one, no download);
  vLLM on the same directory when it imports there;
- demo: `configs/emoji.yaml`'s generation 0 + 1 on CUDA in bf16, one stage at a time (`run_cycle(...,
  stop_after=...)`), with each stage's seconds and peak GPU memory next to the dry run's estimate for it.

    python benchmarks/gpu_check.py --out DIR [--cpu-dry] [--budget-s 450]

DIR gets gpu_check.json (every figure) and gpu_check.md (`benchmarks/gpu_report.py` renders it; run that
again here to write benchmarks/results/gpu_check.md). `--cpu-dry` runs the same steps on the CPU at toy
size (what the tests run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

STEPS = ("env", "tput_demo", "tput_real", "demo")
# Seconds each step may take at most: the demo comes last and also gets what the others leave.
STEP_CAP_S = {"env": 60, "tput_demo": 60, "tput_real": 150, "demo": 420}
# The stage metrics the report shows: losses falling in bf16, annotation validity, the CLIP's val quality.
REPORTED_METRICS = (
    "rows",
    "align/loss_before",
    "align/loss_after",
    "sft/loss_before",
    "sft/loss_after",
    "parse_rate",
    "ok_rate",
    "quality/annotation/f1",
    "quality/alt_text/f1",
    "usable_annotations",
    "val/retrieval_mean_r1",
    "test_zeroshot/top1",
)
VLLM_WHY_NOT = (
    "vllm is not on the GPU image and cannot travel: vllm 0.33.0's wheel is 320.8 MiB and it pins torch 2.14.0 "
    "(528.9 MiB, the image has 2.11.0), against 64 MiB per call for the working tree and every carried wheel"
)

# What each mode runs. gpu: the demo as shipped (generation 0 + 1), real-size throughput. cpu-dry: toy sizes.
MODES = {
    "gpu": {
        "device": "cuda",
        "demo_config": "emoji",
        "demo_overrides": ["device=cuda", "cycle.generations=1"],
        "tput_demo": {"tokens": 96, "batches": [64, 256]},
        "tput_real": {
            "config": "real-vitb16",
            "clip": "ViT-B-16",
            "lm": "Qwen/Qwen2.5-1.5B-Instruct",
            "tokens": 448,  # real-vitb16's annotate.max_new_tokens
            "batches": [32, 128],
        },
    },
    "cpu-dry": {
        "device": "cpu",
        "demo_config": "tiny",
        "demo_overrides": [
            "device=cpu",
            "cycle.generations=1",
            "data.emoji.n_train=48",
            "data.emoji.n_val=8",
            "data.emoji.n_test_retrieval=8",
            "data.emoji.n_test_negatives=8",
            "data.emoji.n_test_compositional=4",
            "data.emoji.n_test_zeroshot_per_object=1",
            "data.emoji.vocab_size=12",
            "train.epochs=1",
            "train.batch_size=16",
            "lvlm.lm.pretrain_epochs=1",
            "lvlm.lm.pretrain_seed_variants=1",
            "lvlm.align.epochs=1",
            "lvlm.sft.epochs=1",
            "annotate.max_new_tokens=8",
        ],
        "tput_demo": {"tokens": 4, "batches": [2, 4]},
        "tput_real": {"config": "real-vitb16", "clip": "hqclip-micro", "lm": "toy", "tokens": 4, "batches": [2]},
    },
}


# ----------------------------------------------------------------------------------------------- helpers
def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)  # a step killed mid-write leaves its last whole record


def gpu_peak(reset: bool = False) -> dict:
    """Peak allocated / reserved CUDA memory since the last reset (GB); {} on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    peak = {
        "peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
    }
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in (
        "torch",
        "torchvision",
        "transformers",
        "tokenizers",
        "peft",
        "open_clip_torch",
        "timm",
        "deepspeed",
        "lancedb",
        "pylance",
        "pyarrow",
        "omegaconf",
        "numpy",
        "pydantic",
        "vllm",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------------------------- steps
def step_env(mode: dict, work: Path, record: dict) -> None:
    import importlib

    import torch

    record["versions"] = versions()
    imports = {}
    for module in ("open_clip", "deepspeed", "lancedb", "lance", "omegaconf", "peft", "cycle.cli"):
        try:
            importlib.import_module(module)
            imports[module] = "ok"
        except Exception as err:  # what breaks on the image is the finding
            imports[module] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    record["imports"] = imports
    record["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record["gpu"] = {"name": props.name, "memory_gb": props.total_memory / 1e9, "count": torch.cuda.device_count()}
        record["bf16"] = torch.cuda.is_bf16_supported()
    record["vllm"] = "importable" if importlib.util.find_spec("vllm") else VLLM_WHY_NOT
    from PIL import features

    from cycle.config import EmojiScenesConfig

    font = Path(EmojiScenesConfig().font)
    carried = REPO / ".gpu-site" / "NotoColorEmoji-subset.ttf"
    record["emoji_font"] = str(font) if font.is_file() else (f"carried: {carried}" if carried.is_file() else "missing")
    record["pillow_raqm"] = bool(features.check("raqm"))


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with `vocab_size` entries: every id decodes, so a random LM of a real vocabulary
    size can generate through the backend; no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def build_real_llava(spec: dict, device: str, work: Path) -> tuple[Path, str]:
    """A LLaVA the size of `spec` (random weights) built by the cycle's own `build_lvlm`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cycle.cli_common import config_file
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip
    from cycle.config import load_config
    from cycle.lvlm import build_lvlm
    from cycle.plan import KNOWN_LMS, LMShape

    shape = KNOWN_LMS[spec["lm"]] if spec["lm"] in KNOWN_LMS else LMShape(64, 2, 4, 2, 128, 1000, True, True)
    tok = synthetic_tokenizer(shape.vocab - 8)  # room for the tokens the LLaVA adds
    config = Qwen2Config(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
        lm = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    lm.save_pretrained(work / "lm")
    tok.save_pretrained(work / "lm")
    del lm
    clip_dir = save_clip(create_clip(spec["clip"])[0], spec["clip"], work / "clip")
    cfg = load_config(config_file(spec["config"]), [f"lvlm.lm.name={work / 'lm'}", f"device={device}"])
    model_dir = build_lvlm(clip_dir, work / "lm", cfg.lvlm, work / "lvlm", device=device)
    return model_dir, f"{spec['clip']} tower + {spec['lm']}-shaped LM (random weights, synthetic vocabulary)"


def throughput(model_dir: Path, what: str, spec: dict, device: str, record: dict, out: Path) -> None:
    """Images/s of the transformers backend at each batch size, then vLLM's on the same directory if it imports."""
    import importlib.util

    import torch
    from bench_annotate import images
    from transformers import AutoConfig

    from cycle.annotate.backends.transformers_backend import TransformersBackend

    tokens = spec["tokens"]
    backend = TransformersBackend(model_dir, device=device, max_new_tokens=tokens, min_new_tokens=tokens)
    config = AutoConfig.from_pretrained(model_dir)
    record.update(
        model=what,
        params_m=sum(p.numel() for p in backend.model.parameters()) / 1e6,
        dtype=str(backend.model.dtype).replace("torch.", ""),
        image_tokens=config.image_seq_length,
        tokens_per_image=tokens,
        rows=[],
    )
    size = config.vision_config.image_size
    data = images(max(spec["batches"]), size)
    backend.max_new_tokens = backend.min_new_tokens = 8  # warm-up (kernels, allocator): short, it is not timed
    backend.generate(data[:2])
    backend.max_new_tokens = backend.min_new_tokens = tokens
    for batch in spec["batches"]:
        gpu_peak(reset=True)
        start = backend.generated_tokens
        t0 = time.perf_counter()
        backend.generate(data[:batch])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n_tokens = backend.generated_tokens - start
        row = {"backend": "transformers", "batch": batch, "images": batch, "tokens": n_tokens, "seconds": dt}
        row.update(images_per_s=batch / dt, tokens_per_s=n_tokens / dt, **gpu_peak())
        record["rows"].append(row)
        write_json(out, record)
    backend.close()
    del backend
    if not importlib.util.find_spec("vllm"):
        record["vllm"] = VLLM_WHY_NOT
        return
    from cycle.annotate.backends.vllm_backend import VLLMBackend
    from cycle.config import AnnotateConfig

    vcfg = AnnotateConfig(backend="vllm", max_new_tokens=tokens, temperature=0.0)
    t0 = time.perf_counter()
    vllm = VLLMBackend(vcfg, model_dir, out_dir=out.parent / "vllm", structured=False, min_new_tokens=tokens)
    record["vllm_start_s"] = time.perf_counter() - t0
    try:
        vllm.generate(data[:2])
        for batch in spec["batches"]:
            start, t0 = vllm.generated_tokens, time.perf_counter()
            vllm.generate(data[:batch])
            dt = time.perf_counter() - t0
            n_tokens = vllm.generated_tokens - start
            record["rows"].append(
                {"backend": "vllm", "batch": batch, "images": batch, "tokens": n_tokens, "seconds": dt}
                | {"images_per_s": batch / dt, "tokens_per_s": n_tokens / dt}
            )
            write_json(out, record)
        record["vllm"] = "measured"
    finally:
        vllm.close()


def step_tput_demo(mode: dict, work: Path, record: dict, out: Path) -> None:
    from bench_annotate import build_demo_llava

    model_dir = build_demo_llava(work)  # the demo config's tower and tiny LM, untrained
    throughput(
        model_dir,
        "the demo's LLaVA (configs/emoji.yaml sizes, untrained)",
        mode["tput_demo"],
        mode["device"],
        record,
        out,
    )


def step_tput_real(mode: dict, work: Path, record: dict, out: Path) -> None:
    t0 = time.perf_counter()
    model_dir, what = build_real_llava(mode["tput_real"], mode["device"], work)
    record["build_s"] = time.perf_counter() - t0
    throughput(model_dir, what, mode["tput_real"], mode["device"], record, out)


def step_demo(mode: dict, work: Path, record: dict, out: Path) -> None:
    """Generation 0 + 1, one stage per `run_cycle` call (done stages are skipped), each timed and measured."""
    from cycle.cli_common import config_file
    from cycle.config import load_config
    from cycle.controller import run_cycle
    from cycle.pipeline import stages_of
    from cycle.plan import GB, make_plan
    from cycle.state import RunState

    overrides = [*mode["demo_overrides"], f"root={work / 'runs'}"]
    cfg = load_config(config_file(mode["demo_config"]), overrides)
    carried_font = REPO / ".gpu-site" / "NotoColorEmoji-subset.ttf"  # gpu_wheels.sh: the image has no emoji font
    if not Path(cfg.data.emoji.font).is_file() and carried_font.is_file():
        overrides.append(f"data.emoji.font={carried_font}")
        cfg = load_config(config_file(mode["demo_config"]), overrides)
    planned = {m.stage: m.total / GB for m in make_plan(cfg, gpu_memory_gb=0).memory}
    record.update(config=mode["demo_config"], overrides=overrides[: len(mode["demo_overrides"])], stages=[])
    record["font"] = cfg.data.emoji.font
    t_all = time.perf_counter()
    for gen in range(cfg.cycle.generations + 1):
        for stage in stages_of(gen):
            gpu_peak(reset=True)
            t0 = time.perf_counter()
            run_cycle(cfg, progress=False, stop_after=f"{gen}:{stage}")
            entry = RunState(cfg.run_dir).stage(gen, stage)
            row = {"gen": gen, "stage": stage, "seconds": time.perf_counter() - t0, **gpu_peak()}
            row["planned_gb"] = planned.get(stage)
            metrics = entry.get("metrics") or {}
            row["metrics"] = {k: metrics[k] for k in REPORTED_METRICS if isinstance(metrics.get(k), (int, float))}
            record["stages"].append(row)
            record["total_s"] = time.perf_counter() - t_all
            write_json(out, record)


def run_step(name: str, mode_name: str, work: Path) -> None:
    """In the child process: run one step, writing `work/<name>.json` as it goes."""
    out = work / f"{name}.json"
    record = {"status": "running"}
    write_json(out, record)
    t0 = time.perf_counter()
    step_work = work / name
    step_work.mkdir(parents=True, exist_ok=True)
    mode = MODES[mode_name]
    try:
        if name == "env":
            step_env(mode, step_work, record)
        else:
            globals()[f"step_{name}"](mode, step_work, record, out)
        record["status"] = "ok"
    except Exception as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {err}"[:2000]
        record["traceback"] = traceback.format_exc()[-4000:]
    record["seconds"] = time.perf_counter() - t0
    write_json(out, record)


# ----------------------------------------------------------------------------------------------- driver
def run_with_timeout(cmd: list[str], log, timeout: float) -> int:
    """Run a step in its own process group; past `timeout` kill the whole group (a worker left holding GPU
    memory would skew the next step) and raise TimeoutExpired."""
    import signal

    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu-dry", action="store_true", help="the same steps on the CPU at toy size")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds for all steps together")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument(
        "--step-cap-s", type=float, default=0.0, help="at most this many seconds per step (0: each its own)"
    )
    ap.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    ap.add_argument("--step", default="", help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run the steps in this process, without timeouts (the tests: no interpreter start per step)",
    )
    args = ap.parse_args(argv)
    mode_name = "cpu-dry" if args.cpu_dry else "gpu"
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        print(f"error: --steps: unknown step(s) {', '.join(unknown)} (known: {', '.join(STEPS)})", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print("error: --budget-s must be > 0", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.step:
        run_step(args.step, mode_name, work)
        return 0

    from gpu_report import render

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "mode": mode_name,
        "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "steps": {},
    }
    deadline = time.monotonic() + args.budget_s
    for name in steps:
        left = deadline - time.monotonic()
        if left < 5:
            report["steps"][name] = {"status": "skipped", "error": "no time left in --budget-s"}
            continue
        timeout = min(STEP_CAP_S[name], left) if name != "demo" else left
        timeout = min(timeout, args.step_cap_s) if args.step_cap_s > 0 else timeout
        cmd = [sys.executable, __file__, "--out", str(out), "--work", str(work), "--step", name]
        cmd += ["--cpu-dry"] if args.cpu_dry else []
        print(f"[gpu_check] {name}: up to {timeout:.0f} s", flush=True)
        part = work / f"{name}.json"
        part.unlink(missing_ok=True)  # a record left by an earlier check in the same --work is not this one's
        t0 = time.perf_counter()
        with open(work / f"{name}.log", "w") as log:
            try:
                if args.in_process:
                    run_step(name, mode_name, work)
                    rc = 0
                else:
                    rc = run_with_timeout(cmd, log, timeout)
            except subprocess.TimeoutExpired:
                rc = None
        record = json.loads(part.read_text()) if part.is_file() else {}
        if rc is None:
            record.update(status="timeout", error=f"stopped after {timeout:.0f} s (what it wrote is kept)")
        elif rc != 0 or record.get("status") in (None, "running"):
            record.update(status="failed", error=record.get("error") or f"exit status {rc}")
        record["wall_s"] = time.perf_counter() - t0
        if record["status"] != "ok":
            record["log_tail"] = (work / f"{name}.log").read_text(errors="replace")[-3000:]
        report["steps"][name] = record
        print(f"[gpu_check] {name}: {record['status']} in {record['wall_s']:.0f} s", flush=True)
        write_json(out / "gpu_check.json", report)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(render(report))
    print((out / "gpu_check.md").read_text())
    return 0 if all(r.get("status") == "ok" for r in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
