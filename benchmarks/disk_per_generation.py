"""Disk per generation at 7B with LoRA, measured on the tiny real architecture and scaled by parameter count.

The pipeline's own stages (lm, then lvlm -> align -> sft for generations 1 and 2, each generation's tower
a different CLIP) run on tests/test_real_arch.py's tiny llava-hf LLaVA (CLIP vision + Qwen2 text, started
from through `lvlm.base` as configs/real-7b-80gb.yaml does) in bf16 with LoRA on all seven LM projections
and `lvlm.sft_save=auto` (adapter + projector, no merged copy), in one run folder. A LLaVA is stored as
lm/tower/projector files, and a part equal to one of an earlier LLaVA of the run is a hard link
(`cycle.lvlm.weights`): each generation is charged only the files (inodes) that first appear in it. Each
file's tensor bytes per stored parameter times the parameters of the same part at 7B (from `cycle.plan`,
which matches built models exactly) give the 7B figures, next to the dry run's estimate. The CLIP folder is
not measured here (a training run): the dry run's.

    python benchmarks/disk_per_generation.py      # ~1 minute on 2 cores

Writes benchmarks/results/disk_per_generation.md.
"""

from __future__ import annotations

import json
import os
import struct
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
GENERATIONS = (1, 2)


def tensor_params(file: Path) -> tuple[int, int, list[str]]:
    """(parameters, tensor data bytes, dtypes) of a safetensors file, from its header."""
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    params, data, dtypes = 0, 0, set()
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for d in entry["shape"]:
            n *= d
        params += n
        data += entry["data_offsets"][1] - entry["data_offsets"][0]
        dtypes.add(entry["dtype"])
    return params, data, sorted(dtypes)


def part_of(path: Path) -> str:
    """What a weight file holds: lm, tower, projector (a LLaVA's parts or SFT's projector), adapter."""
    if path.parent.name == "adapter":
        return "adapter"
    return path.name.split(".")[0]


def measure(work: Path) -> dict:
    """Run generations 1 and 2's LVLM stages on the tiny real architecture in one run folder; per
    generation, every file it wrote that no earlier generation holds (by inode), with its parameters."""
    import test_real_arch as real_arch

    world = real_arch.build_real_arch_world(work)
    import torch

    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    torch.manual_seed(2)  # generation 2's tower: the shape of generation 1's (registered above), other weights
    clip_gen2 = save_clip(create_clip("test-vitb16-w32")[0], "test-vitb16-w32", work / "clip-32-gen2")
    root = work / "run"
    cfg = real_arch.cfg_for(
        world,
        f"lvlm.base={world['base']}",
        "lvlm.dtype=bf16",
        "lvlm.sft_save=auto",
        "lvlm.lora.target_modules=[" + ",".join(TARGETS) + "]",
        f"root={work}",
        "name=run",
    )
    data = {"samples_version": world["sv"], "teacher_version": world["tv"]}
    lm = real_arch.run_stage(cfg, "lm", {"data": data}, root / "gen-001" / "lm").outputs
    seen: set = set()
    out: dict = {}
    for g, clip in zip(GENERATIONS, (world["clip32"], clip_gen2)):
        gen_dir = root / f"gen-{g:03d}" / "lvlm"
        built = real_arch.run_stage(cfg, "lvlm", {"clip": str(clip), "lm": lm["lm"]}, gen_dir / "base").outputs
        pins = {"data": data, "generation": g, "previous": None}
        aligned = real_arch.run_stage(cfg, "align", {**pins, "base": built}, gen_dir / "aligned").outputs
        sft = real_arch.run_stage(cfg, "sft", {**pins, "aligned": aligned}, gen_dir / "sft").outputs
        assert sft["merged"] is None, "adapter-only SFT expected (lvlm.sft_save=auto with LoRA on a real LM)"
        files = []
        in_order = [p for folder in ("base", "aligned", "sft") for p in sorted((gen_dir / folder).rglob("*"))]
        for path in (p for p in in_order if p.is_file()):  # stage order: a link is charged to its source
            st = path.stat()
            new = (st.st_dev, st.st_ino) not in seen
            seen.add((st.st_dev, st.st_ino))
            row = {"file": str(path.relative_to(gen_dir)), "bytes": st.st_size, "new": new}
            if path.suffix == ".safetensors":
                row["params"], row["tensor_bytes"], row["dtypes"] = tensor_params(path)
                row["part"] = part_of(path)
            files.append(row)
        out[g] = files
    return out


def real_counts() -> tuple[dict, dict]:
    """Parameters of each part at 7B (the real config), and the dry run's plan."""
    from cycle.cli_common import config_file
    from cycle.config import load_config
    from cycle.plan import clip_shape, lm_shape, lora_params, make_plan

    cfg = load_config(config_file(REAL_CONFIG))
    clip = clip_shape(cfg.clip.name)
    _, lm = lm_shape(cfg)
    p_proj = clip.vision.width * lm.hidden + lm.hidden + lm.hidden * lm.hidden + lm.hidden
    counts = {
        "lm": lm.params(),
        "tower": clip.vision_params(),
        "projector": p_proj,
        "adapter": lora_params(lm, cfg.lvlm.lora.r, list(cfg.lvlm.lora.target_modules)),
    }
    return counts, {"cfg": cfg, "plan": make_plan(cfg, gpu_memory_gb=0), "clip_params": clip.params()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="disk-per-gen-") as tmp:
        tiny = measure(Path(tmp))
    counts, real = real_counts()
    cfg, plan = real["cfg"], real["plan"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [
        f"# Disk per generation at 7B with LoRA (`configs/{REAL_CONFIG}.yaml`), at {commit.stdout.strip()}",
        "",
        "Measured on the tiny real architecture (tests/test_real_arch.py: a llava-hf LLaVA with a CLIP vision "
        "config and a Qwen2 text config, started from through `lvlm.base`): generations 1 and 2's LVLM stages "
        "run by the pipeline in one run folder, bf16, LoRA on the seven LM projections, `lvlm.sft_save=auto`, "
        "each generation's tower a different CLIP. A generation is charged the files (inodes) that first "
        "appear in it; a hard link to an earlier file costs nothing. Weight files are scaled by their tensor "
        "bytes per parameter times the same part's parameters at 7B; other files (headers, configs, "
        f"tokenizer) are not scaled ({cfg.lvlm.base}, LoRA r={cfg.lvlm.lora.r}, tower {cfg.clip.name}). "
        "Written by `benchmarks/disk_per_generation.py`.",
        "",
        "| generation | file | stored | tiny: parameters | tiny: bytes | dtypes | bytes / parameter | 7B: parameters "
        "| 7B: GB charged |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    totals: dict = {}
    for g, files in tiny.items():
        total = 0.0
        for row in files:
            if "part" not in row:
                big = row["bytes"] if row["new"] else 0
                totals.setdefault((g, "other"), 0)
                totals[(g, "other")] += big
                total += big
                continue
            rate = row["tensor_bytes"] / row["params"]
            big_params = counts[row["part"]]
            big = (row["bytes"] - row["tensor_bytes"] + rate * big_params) if row["new"] else 0.0
            total += big
            lines.append(
                f"| {g} | `{row['file']}` | {'new file' if row['new'] else 'hard link'} | {row['params']:,} | "
                f"{row['bytes']:,} | {', '.join(row['dtypes'])} | {rate:.2f} | {big_params / 1e6:,.1f}M | "
                f"{big / 1e9:.3f} |"
            )
        lines.append(
            f"| {g} | other files (configs, tokenizer, info, logs) | | | "
            f"{sum(r['bytes'] for r in files if 'part' not in r and r['new']):,} | | | | "
            f"{totals.get((g, 'other'), 0) / 1e9:.6f} |"
        )
        totals[g] = total
    clip_bytes = plan.disk["clip (weights + training checkpoint)"]
    plan_lvlm = sum(v for k, v in plan.disk.items() if k.startswith("lvlm/"))
    once = sum(plan.disk_once.values())
    lines += [
        "",
        f"- Generation 1's LVLM folders at 7B: **{totals[1] / 1e9:.2f} GB** (the dry run: {plan_lvlm / 1e9:.2f} "
        f"per generation + {once / 1e9:.2f} once for the LM).",
        f"- Generation 2's: **{totals[2] / 1e9:.2f} GB** (the dry run: {plan_lvlm / 1e9:.2f}); with the CLIP's "
        f"{clip_bytes / 1e9:.2f} GB (the dry run's), **{(totals[2] + clip_bytes) / 1e9:.2f} GB** per generation "
        f"(the dry run: {sum(plan.disk.values()) / 1e9:.2f}).",
        "- Before the LLaVA was stored in parts (at 96574b7) a generation wrote two full bf16 copies, "
        "`lvlm/base` and `lvlm/aligned`, 28.30 GB at 7B, and 36.68 GB in all with the CLIP.",
    ]
    out = REPO / "benchmarks" / "results" / "disk_per_generation.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"tiny": tiny, "real_params": counts}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
