"""Disk per generation at 7B with LoRA, measured on the tiny real architecture and scaled by parameter count.

The pipeline's own stages (lm -> lvlm -> align -> sft) run on tests/test_real_arch.py's tiny llava-hf
LLaVA (CLIP vision + Qwen2 text, started from through `lvlm.base` as configs/real-7b-80gb.yaml does) in
bf16 with LoRA on all seven LM projections and `lvlm.sft_save=auto` (adapter + projector, no merged copy).
Each folder a generation writes is measured in bytes and divided by the parameters it holds: bytes per
parameter (the element size plus file overhead). Those rates times the parameter counts of
configs/real-7b-80gb.yaml (from `cycle.plan`, which matches built models exactly) give the 7B figures,
next to the dry run's estimate. The CLIP folder is not measured here (a training run): the dry run's.

    python benchmarks/disk_per_generation.py      # ~1 minute on 2 cores

Writes benchmarks/results/disk_per_generation.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
REAL_CONFIG = "real-7b-80gb"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # as the real configs


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]


def stored_params(path: Path) -> dict[str, list[int]]:
    """{"projector" | "rest": [parameters, bytes of tensor data]} in a safetensors file or a folder's files,
    read from their headers: the data scales with the parameters; headers, configs, tokenizer files do not.
    The LLaVA's projector is its own group: it is kept in fp32 after alignment, the rest in bf16."""
    import json as _json
    import struct

    groups = {"projector": [0, 0], "rest": [0, 0]}
    for file in safetensors_files(path):
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = _json.loads(f.read(header_len))
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            n = 1
            for d in entry["shape"]:
                n *= d
            group = groups["projector" if "multi_modal_projector" in key else "rest"]
            group[0] += n
            group[1] += entry["data_offsets"][1] - entry["data_offsets"][0]
    return groups


def measure(work: Path) -> dict:
    """Run the LVLM stages of one generation on the tiny real architecture; bytes and parameters per folder."""
    import test_real_arch as real_arch

    world = real_arch.build_real_arch_world(work)
    cfg = real_arch.cfg_for(
        world,
        f"lvlm.base={world['base']}",
        "lvlm.dtype=bf16",
        "lvlm.sft_save=auto",
        "lvlm.lora.target_modules=[" + ",".join(TARGETS) + "]",
    )
    root = work / "run"
    data = {"samples_version": world["sv"], "teacher_version": world["tv"]}
    lm = real_arch.run_stage(cfg, "lm", {"data": data}, root / "lm").outputs
    built = real_arch.run_stage(cfg, "lvlm", {"clip": str(world["clip32"]), "lm": lm["lm"]}, root / "base").outputs
    pins = {"data": data, "generation": 1, "previous": None}
    aligned = real_arch.run_stage(cfg, "align", {**pins, "base": built}, root / "aligned").outputs
    sft = real_arch.run_stage(cfg, "sft", {**pins, "aligned": aligned}, root / "sft").outputs
    assert sft["merged"] is None, "adapter-only SFT expected (lvlm.sft_save=auto with LoRA on a real LM)"
    sft_dir = root / "sft"
    folders = {
        "lvlm/base (LLaVA)": Path(built["lvlm"]),
        "lvlm/aligned (LLaVA)": Path(aligned["lvlm"]),
        "lvlm/sft adapter": sft_dir / "adapter",
        "lvlm/sft projector": sft_dir / "projector.safetensors",
    }
    out = {}
    for name, path in folders.items():
        size = folder_bytes(path) if path.is_dir() else path.stat().st_size
        groups = stored_params(path)
        out[name] = {
            "bytes": size,
            "params": sum(g[0] for g in groups.values()),
            "tensor_bytes": sum(g[1] for g in groups.values()),
            "groups": groups,
        }
    out["lvlm/sft other (info, log)"] = {
        "bytes": folder_bytes(sft_dir) - out["lvlm/sft adapter"]["bytes"] - out["lvlm/sft projector"]["bytes"],
        "params": 0,
        "tensor_bytes": 0,
    }
    out["_dtypes"] = _dtypes(folders)
    return out


def _dtypes(folders: dict[str, Path]) -> dict[str, list[str]]:
    from safetensors import safe_open

    out = {}
    for name, path in folders.items():
        kinds = set()
        for file in safetensors_files(path):
            with safe_open(str(file), "pt") as f:
                kinds |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        out[name] = sorted(kinds)
    return out


def real_counts() -> tuple[dict, dict]:
    """Parameter counts of the real config's folders, and the dry run's disk estimate (bytes) of each."""
    from cycle.cli_common import config_file
    from cycle.config import load_config
    from cycle.plan import clip_shape, lm_shape, lora_params, make_plan

    cfg = load_config(config_file(REAL_CONFIG))
    clip = clip_shape(cfg.clip.name)
    _, lm = lm_shape(cfg)
    p_proj = clip.vision.width * lm.hidden + lm.hidden + lm.hidden * lm.hidden + lm.hidden
    p_llava = clip.vision_params() + p_proj + lm.params()
    lora = lora_params(lm, cfg.lvlm.lora.r, list(cfg.lvlm.lora.target_modules))
    counts = {  # per folder: {group: parameters at 7B}
        "lvlm/base (LLaVA)": {"projector": p_proj, "rest": p_llava - p_proj},
        "lvlm/aligned (LLaVA)": {"projector": p_proj, "rest": p_llava - p_proj},
        "lvlm/sft adapter": {"rest": lora},
        "lvlm/sft projector": {"rest": p_proj},
    }
    plan = make_plan(cfg, gpu_memory_gb=0)
    return counts, {"cfg": cfg, "disk": plan.disk, "clip_params": clip.params()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="disk-per-gen-") as tmp:
        tiny = measure(Path(tmp))
    dtypes = tiny.pop("_dtypes")
    counts, plan = real_counts()
    cfg = plan["cfg"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [
        f"# Disk per generation at 7B with LoRA (`configs/{REAL_CONFIG}.yaml`), at {commit.stdout.strip()}",
        "",
        "Measured on the tiny real architecture (tests/test_real_arch.py: a llava-hf LLaVA with a CLIP vision "
        "config and a Qwen2 text config, started from through `lvlm.base`), one generation's LVLM stages run by "
        "the pipeline in bf16 with LoRA on the seven LM projections and `lvlm.sft_save=auto`; each folder's "
        "tensor data bytes per stored parameter times the parameters of the same folder at 7B, plus its other "
        "bytes (headers, configs, tokenizer: not scaled) "
        f"({cfg.lvlm.base}, LoRA r={cfg.lvlm.lora.r}, tower {cfg.clip.name}). "
        "Written by `benchmarks/disk_per_generation.py`.",
        "",
        "| folder | tiny: parameters | tiny: bytes (all files) | tensor data bytes / parameter | dtypes "
        "| 7B: parameters | 7B: GB (scaled) | dry run GB |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    plan_disk = plan["disk"]
    plan_key = {
        "lvlm/base (LLaVA)": "lvlm/base (LLaVA)",
        "lvlm/aligned (LLaVA)": "lvlm/aligned (LLaVA)",
        "lvlm/sft adapter": "lvlm/sft (adapter + projector)",
    }
    scaled_total = 0.0
    scaled_sft = 0.0
    for name, m in tiny.items():
        fixed = m["bytes"] - m["tensor_bytes"]  # headers, configs, tokenizer: not proportional to parameters
        if not m["params"]:
            big = fixed
            lines.append(f"| {name} | | {m['bytes']:,} | | | | {big / 1e9:.6f} (not scaled) | |")
        else:
            rate = m["tensor_bytes"] / m["params"]
            # each group at its own measured bytes per parameter (the fp32 projector beside bf16 weights)
            big = fixed + sum(n * m["groups"][g][1] / max(m["groups"][g][0], 1) for g, n in counts[name].items())
            estimate = plan_disk.get(plan_key.get(name, ""))
            est = f"{estimate / 1e9:.2f}" if estimate is not None else ""
            est += " (adapter + projector)" if name == "lvlm/sft adapter" else ""
            est = est or ("with the adapter" if "projector" in name else "")
            lines.append(
                f"| {name} | {m['params']:,} | {m['bytes']:,} | {rate:.2f} | {', '.join(dtypes.get(name, []))} | "
                f"{sum(counts[name].values()) / 1e6:,.1f}M | {big / 1e9:.3f} | {est} |"
            )
        scaled_total += big
        if name.startswith("lvlm/sft"):
            scaled_sft += big
    clip_bytes = plan_disk["clip (weights + training checkpoint)"]
    lines += [
        f"| clip (weights + training checkpoint) | | | | | {plan['clip_params'] / 1e6:,.1f}M | (not measured) | "
        f"{clip_bytes / 1e9:.2f} |",
        "",
        f"- LVLM folders of one generation at 7B: **{scaled_total / 1e9:.2f} GB** scaled from the measurement "
        f"(+ the CLIP's {clip_bytes / 1e9:.2f} GB from the dry run: "
        f"**{(scaled_total + clip_bytes) / 1e9:.2f} GB** per generation; the dry run says "
        f"{sum(plan_disk.values()) / 1e9:.2f} GB).",
        f"- What SFT writes: **{scaled_sft / 1e9:.3f} GB** (adapter + projector) instead of a merged bf16 copy of "
        f"{sum(counts['lvlm/base (LLaVA)'].values()) * 2 / 1e9:.2f} GB. The adapter is kept in fp32 "
        "(it trains in fp32 over the bf16 model): 4 bytes per parameter; the projector file holds the bf16 "
        "weights SFT trained over.",
        f"- The two full copies left, `lvlm/base` and `lvlm/aligned` "
        f"({2 * sum(counts['lvlm/base (LLaVA)'].values()) * 2 / 1e9:.1f}"
        " GB together), differ only in the projector: alignment trains nothing else. Keeping the aligned "
        "projector alone (as SFT keeps its adapter) would save one of them.",
    ]
    out = REPO / "benchmarks" / "results" / "disk_per_generation.md"
    out.write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(json.dumps({"tiny": tiny, "dtypes": dtypes, "real_params": counts}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
