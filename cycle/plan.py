"""`hqclip run CONFIG --dry-run`: what a run needs before it runs, computed offline from the config.

- the plan: generations x stages;
- the memory of each stage on one GPU: weights (parameters x bytes), optimizer states (AdamW: fp32 master
  weights + two moments), activations (roughly: per transformer layer s*b*h*(34 + 5*a*s/h) bytes in
  16-bit, Korthikanti et al. 2022, plus the LM's logits) and the KV cache of annotation;
- the disk each generation leaves (the LLaVA parts it writes: a LLaVA is stored as lm/tower/projector
  files and a part equal to an earlier one is a hard link (`lvlm.weights`), so the LM is written once per
  run, or once per generation by a merged SFT output; the SFT output: adapter + projector with LoRA against
  a merged copy; the CLIP and its training checkpoint), and what the run writes once (the LM).

Parameter counts come from the model configs, never from downloads: open_clip's model configs are
bundled (ours are registered), an LM is sized from `KNOWN_LMS` by name or from a local `config.json`
(a LLaVA's `text_config`). Estimates, not measurements: the GPU session is what checks them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import RunConfig, sft_adapter_only
from .errors import HQClipError

GB = 1e9  # GPU sizes are sold in GB; planning in 1e9 bytes leaves a little headroom on a real card
ADAMW_BYTES = 16  # per trained parameter: fp32 master weight 4 + fp32 grad 4 + AdamW moments 8
LOGIT_BYTES = 10  # per logit in training: 16-bit logits 2 + fp32 upcast for the loss 4 + its grad 4
ACT_FP32_FACTOR = 2  # activations in fp32 take twice the 16-bit figure
PROMPT_TEXT_TOKENS = 64  # the student prompt with an alt-text: <= 47 measured (benchmarks/results/token_budget.md)
TINY_EXTRA_TOKENS = 16  # special tokens and JSON skeleton pieces the tiny tokenizer adds to its vocabulary


class PlanError(HQClipError):
    """A model the dry run cannot size offline, or a stage that does not fit the stated GPU."""


@dataclass(frozen=True)
class LMShape:
    """A decoder-only LM (Llama / Qwen2 layout): enough to count parameters and size the KV cache."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool
    head_dim: int = 0  # 0: hidden / heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.hd
        q_out = self.heads * self.hd
        attn = h * q_out + 2 * h * kv + q_out * h + ((q_out + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection peft's LoRA may target, per layer."""
        h, kv, q_out, i = self.hidden, self.kv_heads * self.hd, self.heads * self.hd, self.intermediate
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


# Shapes of the LMs the shipped configs name (from their published config.json files), so a dry run
# needs no hub. Other names: a local directory with a config.json.
KNOWN_LMS: dict[str, LMShape] = {
    "Qwen/Qwen2.5-0.5B-Instruct": LMShape(896, 24, 14, 2, 4864, 151936, True, True),
    "Qwen/Qwen2.5-1.5B-Instruct": LMShape(1536, 28, 12, 2, 8960, 151936, True, True),
    "Qwen/Qwen2.5-3B-Instruct": LMShape(2048, 36, 16, 2, 11008, 151936, True, True),
    "Qwen/Qwen2.5-7B-Instruct": LMShape(3584, 28, 28, 4, 18944, 152064, False, True),
    "lmsys/vicuna-7b-v1.5": LMShape(4096, 32, 32, 32, 11008, 32000, False, False),
    "llava-hf/llava-1.5-7b-hf": LMShape(4096, 32, 32, 32, 11008, 32064, False, False),
    "llava-hf/llava-1.5-13b-hf": LMShape(5120, 40, 40, 40, 13824, 32064, False, False),
}
QKV_BIAS_TYPES = ("qwen2",)  # decoder types whose q/k/v projections have biases


def lm_shape_from_config(config: dict) -> LMShape:
    """An LM's shape from its HF config dict (a LLaVA's: its `text_config`)."""
    if "text_config" in config:
        config = config["text_config"]
    heads = config["num_attention_heads"]
    return LMShape(
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=config.get("model_type") in QKV_BIAS_TYPES or bool(config.get("attention_bias", False)),
        head_dim=config.get("head_dim") or 0,
    )


def lm_shape(cfg: RunConfig) -> tuple[str, LMShape]:
    """(name, shape) of the run's LM: the tiny one from `lvlm.lm`, a known name, or a local config.json."""
    lm = cfg.lvlm.lm
    name = cfg.lvlm.base.strip() or lm.name
    if name == "tiny":
        return name, LMShape(
            lm.hidden_size,
            lm.num_layers,
            lm.num_heads,
            lm.num_heads,
            4 * lm.hidden_size,
            lm.vocab_size + TINY_EXTRA_TOKENS,
            True,
            False,
        )
    if name in KNOWN_LMS:
        return name, KNOWN_LMS[name]
    config = Path(name) / "config.json"
    if config.is_file():
        return name, lm_shape_from_config(json.loads(config.read_text()))
    key = "lvlm.base" if cfg.lvlm.base.strip() else "lvlm.lm.name"
    raise PlanError(
        f"config key '{key}': cannot size '{name}' offline: not a local directory with a config.json and "
        f"not one of the known LMs ({', '.join(KNOWN_LMS)})"
    )


@dataclass(frozen=True)
class Tower:
    """A plain open_clip transformer tower: what its parameter count and activations need."""

    width: int
    layers: int
    heads: int
    mlp: int
    tokens: int  # sequence length through the tower

    def block_params(self) -> int:
        w = self.width
        return 4 * w + 3 * w * w + 3 * w + w * w + w + w * self.mlp + self.mlp + self.mlp * w + w


@dataclass(frozen=True)
class ClipShape:
    name: str
    vision: Tower
    text: Tower
    patch: int
    image_size: int
    embed_dim: int
    vocab: int

    def vision_params(self) -> int:
        v = self.vision
        return (
            3 * self.patch * self.patch * v.width  # conv1, no bias
            + v.width  # class embedding
            + v.tokens * v.width  # position embedding
            + 4 * v.width  # ln_pre, ln_post
            + v.layers * v.block_params()
        )

    def params(self) -> int:
        t = self.text
        text = self.vocab * t.width + t.tokens * t.width + t.layers * t.block_params() + 2 * t.width
        projections = self.vision.width * self.embed_dim + t.width * self.embed_dim
        return self.vision_params() + text + projections + 1  # + logit scale


def clip_shape(name: str) -> ClipShape:
    """The CLIP's shape from its open_clip model config (bundled with open_clip, or ours): no weights."""
    import open_clip

    from .clip.model import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        raise PlanError(f"config key 'clip.name': no bundled open_clip config for '{name}' to size it from")
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in v or "hf_model_name" in t or not isinstance(v.get("layers"), int):
        raise PlanError(f"config key 'clip.name': '{name}' is not a plain ViT + text transformer; cannot size it")
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    grid = size // v["patch_size"]
    vw, tw = v["width"], t["width"]
    vision = Tower(vw, v["layers"], vw // v.get("head_width", 64), int(vw * v.get("mlp_ratio", 4.0)), grid * grid + 1)
    text = Tower(tw, t["layers"], t.get("heads", 8), int(tw * t.get("mlp_ratio", 4.0)), t.get("context_length", 77))
    return ClipShape(name, vision, text, v["patch_size"], size, cfg["embed_dim"], t.get("vocab_size", 49408))


def layer_activations(tokens: int, batch: int, width: int, heads: int) -> float:
    """Bytes one transformer layer keeps for its backward pass in 16-bit (Korthikanti et al. 2022)."""
    return tokens * batch * width * (34 + 5 * heads * tokens / width)


@dataclass
class StageMemory:
    stage: str
    weights: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    kv_cache: float = 0.0
    note: str = ""
    share: float = 1.0  # of the GPU the stage may use (vLLM takes annotate.vllm.gpu_memory_utilization)

    @property
    def total(self) -> float:
        return self.weights + self.optimizer + self.activations + self.kv_cache


@dataclass
class Plan:
    generations: list[list[str]]
    memory: list[StageMemory]
    disk: dict[str, float]  # what one generation >= 1 leaves, bytes
    disk_once: dict[str, float]  # what the run writes once (generation 1's LM), bytes
    disk_alternative: dict[str, float]  # the SFT output the other way (merged copy vs adapter)
    facts: dict[str, str]
    gpu_memory_gb: float

    def too_big(self) -> list[StageMemory]:
        limit = self.gpu_memory_gb * GB
        return [m for m in self.memory if self.gpu_memory_gb > 0 and m.total > limit * m.share]


def lora_params(shape: LMShape, r: int, targets: list[str]) -> int:
    per_layer = sum(r * (i + o) for name, (i, o) in shape.linear_shapes().items() if name in targets)
    return shape.layers * per_layer


def make_plan(cfg: RunConfig, gpu_memory_gb: Optional[float] = None) -> Plan:
    """Every estimate for `cfg`, for a GPU of `gpu_memory_gb` (None: `cfg.gpu_memory_gb`; 0: no limit)."""
    from .pipeline import stages_of

    gpu = cfg.gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
    clip = clip_shape(cfg.clip.name)
    lm_name, lm = lm_shape(cfg)
    lv, t = cfg.lvlm, cfg.train
    # planned for a GPU: "auto" precision means bf16 there
    wbytes = 4 if lv.dtype == "fp32" else 2
    clip_bf16 = t.precision != "fp32"
    p_clip, p_lm = clip.params(), lm.params()
    p_tower = clip.vision_params()
    p_proj = clip.vision.width * lm.hidden + lm.hidden + lm.hidden * lm.hidden + lm.hidden
    p_llava = p_tower + p_proj + p_lm
    image_tokens = (clip.image_size // clip.patch) ** 2 + (1 if lv.keep_cls_token else 0)
    seq = image_tokens + lv.lm.max_length  # what align and SFT train on, and annotation's longest sequence
    act_factor = 1 if wbytes == 2 else ACT_FP32_FACTOR
    memory: list[StageMemory] = []

    ws = t.world_size
    micro = t.micro_batch_size or t.batch_size // ws
    v, x = clip.vision, clip.text
    clip_act = v.layers * layer_activations(v.tokens, micro, v.width, v.heads) + x.layers * layer_activations(
        x.tokens, 2 * micro, x.width, x.heads
    )  # texts: positives and hard negatives
    shard = ws if t.zero_stage >= 1 else 1
    grads = (2 if clip_bf16 else 4) * p_clip / (ws if t.zero_stage == 2 else 1)
    memory.append(
        StageMemory(
            "train",
            weights=(2 if clip_bf16 else 4) * p_clip,
            optimizer=grads + 12 * p_clip / shard,
            activations=clip_act * (1 if clip_bf16 else ACT_FP32_FACTOR),
            note=f"CLIP, micro-batch {micro}/rank, ZeRO-{t.zero_stage} over {ws}",
        )
    )
    if lm_name == "tiny":
        memory.append(
            StageMemory(
                "lm",
                weights=4 * p_lm,
                optimizer=(ADAMW_BYTES - 4) * p_lm,
                activations=ACT_FP32_FACTOR
                * lm.layers
                * layer_activations(lv.lm.max_length, lv.lm.batch_size, lm.hidden, lm.heads)
                + LOGIT_BYTES * lv.lm.batch_size * lv.lm.max_length * lm.vocab,
                note="tiny LM pretraining",
            )
        )
    else:
        memory.append(StageMemory("lm", note=f"{lm_name}: named, nothing trained"))
    memory.append(StageMemory("lvlm", note=f"built on the CPU: ~{wbytes * p_llava / GB:.1f} GB of RAM"))

    def lm_train_act(batch: int, checkpointing: bool) -> float:
        full = layer_activations(seq, batch, lm.hidden, lm.heads) * act_factor
        stored = lm.layers * (2 * seq * batch * lm.hidden) + full if checkpointing else lm.layers * full
        return stored + LOGIT_BYTES * batch * seq * lm.vocab

    memory.append(
        StageMemory(
            "align",
            weights=wbytes * (p_llava - p_proj) + 4 * p_proj,
            optimizer=(ADAMW_BYTES - 4) * p_proj,
            activations=lm_train_act(lv.align.batch_size, lv.align_gradient_checkpointing),
            note=f"projector only, batch {lv.align.batch_size} x {seq} tokens"
            + (", gradient checkpointing" if lv.align_gradient_checkpointing else ""),
        )
    )
    if lv.lora.enabled:
        p_train = lora_params(lm, lv.lora.r, list(lv.lora.target_modules))
        sft_weights = wbytes * p_llava + 4 * p_train
    else:
        p_train = p_lm
        sft_weights = wbytes * (p_llava - p_lm) + 4 * p_lm  # the trained LM upcast to fp32
    memory.append(
        StageMemory(
            "sft",
            weights=sft_weights,
            optimizer=(ADAMW_BYTES - 4) * p_train,
            activations=lm_train_act(lv.sft.batch_size, lv.sft_gradient_checkpointing),
            note=("LoRA r=%d" % lv.lora.r if lv.lora.enabled else "full LM")
            + f", batch {lv.sft.batch_size} x {seq} tokens"
            + (", gradient checkpointing" if lv.sft_gradient_checkpointing else ""),
        )
    )
    a = cfg.annotate
    # an annotation sequence: the image, the prompt with its alt-text, the answer (max_length bounds both)
    text = max(lv.lm.max_length, PROMPT_TEXT_TOKENS + a.max_new_tokens)
    kv_per_seq = 2 * lm.layers * lm.kv_heads * lm.hd * wbytes * (image_tokens + text)
    if a.backend == "openai":
        memory.append(StageMemory("annotate", weights=4 * p_clip, note="remote annotator; CLIP scorer here"))
    elif a.backend == "vllm":
        seqs = min(a.vllm.max_num_seqs, a.batch_size)
        memory.append(
            StageMemory(
                "annotate",
                weights=wbytes * p_llava,
                kv_cache=kv_per_seq * seqs,
                note=f"vLLM, {seqs} sequences in flight, within its {a.vllm.gpu_memory_utilization:.0%} of the GPU",
                share=a.vllm.gpu_memory_utilization,
            )
        )
    else:
        memory.append(
            StageMemory(
                "annotate",
                weights=wbytes * p_llava + 4 * p_clip,
                kv_cache=kv_per_seq * a.batch_size,
                note=f"transformers, batch {a.batch_size}",
            )
        )
    memory.append(StageMemory("eval", weights=4 * p_clip, note="CLIP in fp32, no gradients"))

    adapter_only = sft_adapter_only(lv)
    # measured (benchmarks/results/disk_per_generation.md): the adapter in fp32 (it trains in fp32), the
    # projector file in the LLaVA's dtype; alignment saves its trained projector in fp32 beside the rest
    sft_small = (4 * p_train + wbytes * p_proj) if lv.lora.enabled else 0.0
    checkpoint = (2 if clip_bf16 else 4) * p_clip + 12 * p_clip  # DeepSpeed's model + optimizer states
    # a LLaVA is three files (lm, tower, projector); a part equal to an earlier one is a hard link
    # (benchmarks/results/disk_per_generation.md): generation 1's base writes the LM, later LLaVAs link it;
    # a merged SFT output writes its changed LM (and generation g+1 links that one when carried)
    merged_sft = wbytes * (p_lm + p_proj) + sft_small  # + the adapter beside it with LoRA
    disk = {
        "lvlm/base (tower + projector; LM linked)": wbytes * (p_tower + p_proj),
        "lvlm/aligned (projector; LM, tower linked)": 4 * p_proj,
        "lvlm/sft (adapter + projector)" if adapter_only else "lvlm/sft (merged LLaVA: LM + projector)": (
            sft_small if adapter_only else merged_sft
        ),
        "clip (weights + training checkpoint)": 4 * p_clip + checkpoint,
    }
    disk_once = {"the LM (generation 1's lvlm/base; later LLaVAs link it)": wbytes * p_lm}
    alternative = (
        {"lvlm/sft (merged LLaVA: LM + projector)": merged_sft}
        if adapter_only
        else ({"lvlm/sft (adapter + projector)": sft_small} if lv.lora.enabled else {})
    )
    facts = {
        "CLIP": f"{cfg.clip.name}: {p_clip / 1e6:.1f}M parameters (vision tower {p_tower / 1e6:.1f}M)",
        "LM": f"{lm_name}: {p_lm / 1e6:.1f}M parameters, {lm.layers} layers, hidden {lm.hidden}",
        "LLaVA": f"{p_llava / 1e6:.1f}M parameters (projector {p_proj / 1e6:.2f}M), {image_tokens} image tokens, "
        f"sequences up to {seq} tokens",
        "trained in SFT": f"{p_train / 1e6:.2f}M parameters" + (" (LoRA)" if lv.lora.enabled else " (whole LM)"),
        "weights": "bf16" if wbytes == 2 else "fp32",
    }
    gens = [stages_of(g) for g in range(cfg.cycle.generations + 1)]
    return Plan(gens, memory, disk, disk_once, alternative, facts, gpu)


def format_plan(cfg: RunConfig, plan: Plan) -> list[str]:
    """The dry run's lines (plain text: it goes to a terminal or a log)."""
    gpu = f"{plan.gpu_memory_gb:g} GB GPU" if plan.gpu_memory_gb else "no GPU size given (--gpu-memory-gb)"
    lines = [f"plan for '{cfg.name}': generation 0 + {cfg.cycle.generations}, planned for one {gpu}"]
    lines += [f"  {k}: {v}" for k, v in plan.facts.items()]
    lines.append("generations x stages:")
    lines += [f"  gen {g}: {' -> '.join(stages)}" for g, stages in enumerate(plan.generations)]
    lines.append("memory per stage on one GPU (GB; estimates):")
    lines.append(f"  {'stage':<9}{'weights':>9}{'optim':>9}{'activ':>9}{'kv':>9}{'total':>9}  fits  note")
    limit = plan.gpu_memory_gb * GB
    for m in plan.memory:
        fits = "-" if not plan.gpu_memory_gb else ("yes" if m.total <= limit * m.share else "NO")
        lines.append(
            f"  {m.stage:<9}{m.weights / GB:>9.2f}{m.optimizer / GB:>9.2f}{m.activations / GB:>9.2f}"
            f"{m.kv_cache / GB:>9.2f}{m.total / GB:>9.2f}  {fits:<4}  {m.note}"
        )
    lines.append("disk per generation >= 1 (GB):")
    lines += [f"  {k}: {v / GB:.2f}" for k, v in plan.disk.items()]
    lines.append(f"  total: {sum(plan.disk.values()) / GB:.2f}")
    lines += [f"  once per run, {k}: {v / GB:.2f}" for k, v in plan.disk_once.items()]
    for k, v in plan.disk_alternative.items():
        lines.append(f"  (the other way: {k} {v / GB:.2f}; lvlm.sft_save)")
    return lines


def check_fits(plan: Plan) -> None:
    """Refuse a plan with a stage over the stated GPU memory, naming the stage and what to change."""
    over = plan.too_big()
    if over:
        m = over[0]
        share = f"{m.share:.0%} of " if m.share < 1 else ""
        raise PlanError(
            f"stage '{m.stage}' needs ~{m.total / GB:.1f} GB, more than {share}the {plan.gpu_memory_gb:g} GB GPU "
            "(--gpu-memory-gb / gpu_memory_gb): lower its batch size, use LoRA, gradient checkpointing "
            "(lvlm.align_gradient_checkpointing, lvlm.sft_gradient_checkpointing), or a smaller model"
        )
