"""The dry-run estimates of the shipped real configs, with the arithmetic behind their largest terms.

Runs `hqclip run CONFIG --dry-run` for configs/real-vitb16.yaml and configs/real-7b-80gb.yaml (offline:
parameter counts come from the model configs) and writes its output to benchmarks/results/dry_run.md,
followed by the few products that make each stage's figure, spelled out from the same shapes so a reader
can check them by hand (the README quotes them).

    python benchmarks/dry_run_report.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIGS = ("real-vitb16", "real-7b-80gb")


def dry_run(name: str) -> str:
    with tempfile.TemporaryDirectory() as root:
        proc = subprocess.run(
            [sys.executable, "-m", "cycle.cli", "run", name, "--dry-run", f"root={root}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise SystemExit(f"hqclip run {name} --dry-run failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.rstrip()


def arithmetic(name: str) -> list[str]:
    """The products behind the estimates, from the shapes the plan uses (GB = 1e9 bytes)."""
    from cycle.cli_common import config_file
    from cycle.config import load_config
    from cycle.plan import LOGIT_BYTES, PROMPT_TEXT_TOKENS, clip_shape, lm_shape, lora_params

    cfg = load_config(config_file(name))
    clip = clip_shape(cfg.clip.name)
    lm_name, lm = lm_shape(cfg)
    lv, a, t = cfg.lvlm, cfg.annotate, cfg.train
    p_clip, p_lm = clip.params(), lm.params()
    p_proj = clip.vision.width * lm.hidden + lm.hidden + lm.hidden * lm.hidden + lm.hidden
    p_llava = clip.vision_params() + p_proj + p_lm
    p_lora = lora_params(lm, lv.lora.r, list(lv.lora.target_modules))
    image_tokens = (clip.image_size // clip.patch) ** 2 + (1 if lv.keep_cls_token else 0)
    seq = image_tokens + lv.lm.max_length
    text = max(lv.lm.max_length, PROMPT_TEXT_TOKENS + a.max_new_tokens)
    kv_token = 2 * lm.layers * lm.kv_heads * lm.hd * 2
    seqs = min(a.vllm.max_num_seqs, a.batch_size)
    micro = t.micro_batch_size or t.batch_size // t.world_size

    def gb(x: float) -> str:
        return f"{x / 1e9:.2f} GB"

    return [
        f"- parameters: CLIP {p_clip / 1e6:.1f}M, LM ({lm_name}) {p_lm / 1e6:.1f}M, projector "
        f"{clip.vision.width}x{lm.hidden} + {lm.hidden}x{lm.hidden} + biases = {p_proj / 1e6:.2f}M, LLaVA = tower "
        f"{clip.vision_params() / 1e6:.1f}M + projector + LM = {p_llava / 1e6:.1f}M",
        f"- LLaVA weights in bf16: {p_llava / 1e6:.1f}M x 2 B = {gb(2 * p_llava)} in memory; on disk the LM "
        f"{p_lm / 1e6:.1f}M x 2 B = {gb(2 * p_lm)} once per run, then per generation the tower + projector "
        f"{(clip.vision_params() + p_proj) / 1e6:.1f}M x 2 B = {gb(2 * (clip.vision_params() + p_proj))} and the "
        f"aligned projector x 4 B = {gb(4 * p_proj)} (the other parts are hard links)",
        f"- CLIP training (bf16, ZeRO-{t.zero_stage}, {t.world_size} rank): weights {p_clip / 1e6:.1f}M x 2 B = "
        f"{gb(2 * p_clip)}; gradients x 2 B = {gb(2 * p_clip)}; fp32 master + AdamW moments x 12 B = "
        f"{gb(12 * p_clip)}",
        f"- LoRA r={lv.lora.r} on {', '.join(lv.lora.target_modules)}: r x (in + out) per projection x "
        f"{lm.layers} layers = {p_lora / 1e6:.2f}M; fp32 weights + AdamW: {p_lora / 1e6:.2f}M x 16 B = "
        f"{gb(16 * p_lora)}; on disk x 4 B = {gb(4 * p_lora)}",
        f"- a full-LM AdamW instead (no LoRA): {p_lm / 1e6:.0f}M x 16 B = {gb(16 * p_lm)}",
        f"- logits in align/SFT: {LOGIT_BYTES} B x batch x {seq} tokens x vocab {lm.vocab}: align batch "
        f"{lv.align.batch_size} = {gb(LOGIT_BYTES * lv.align.batch_size * seq * lm.vocab)}, SFT batch "
        f"{lv.sft.batch_size} = {gb(LOGIT_BYTES * lv.sft.batch_size * seq * lm.vocab)}",
        f"- KV cache: 2 (K, V) x {lm.layers} layers x {lm.kv_heads} KV heads x {lm.hd} x 2 B = "
        f"{kv_token / 1e6:.4f} MB per token; x ({image_tokens} image + {text} text) tokens = "
        f"{kv_token * (image_tokens + text) / 1e6:.1f} MB per sequence; x {seqs} sequences = "
        f"{gb(kv_token * (image_tokens + text) * seqs)}",
        f"- CLIP activations: per layer tokens x batch x width x (34 + 5 x heads x tokens / width) bytes: vision "
        f"{clip.vision.layers} x {clip.vision.tokens} x {micro} x {clip.vision.width}, text {clip.text.layers} x "
        f"{clip.text.tokens} x {2 * micro} x {clip.text.width}",
    ]


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [
        f"# `hqclip run CONFIG --dry-run` for the shipped real configs, at {commit.stdout.strip()}",
        "",
        "Estimates from the model configs (no download), written by `benchmarks/dry_run_report.py`; the "
        "products under each are the arithmetic behind its largest figures (GB = 1e9 bytes).",
        "",
    ]
    for name in CONFIGS:
        lines += [f"## {name}", "", "```", dry_run(name), "```", "", *arithmetic(name), ""]
    out = REPO / "benchmarks" / "results" / "dry_run.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
