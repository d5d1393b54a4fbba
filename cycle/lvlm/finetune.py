"""Stage 2, SFT: teach the aligned LLaVA to write the four formulas from an image and its alt-text.

Input: the image and `schema.model_input(schema.build_prompt(alt_text))`; target: the record's compact
JSON (`schema.to_target_json`) and eos, the loss on the target only. The vision tower and the projector
stay frozen. With `lvlm.lora.enabled`, peft LoRA on the LM's projections only (matched by name under
`model.language_model`: the tower's and projector's linears are never touched; peft's "all-linear"
would hit them); otherwise the whole LM trains (better at tiny sizes, see ENV-FACTS).

Output `out_dir/`: `adapter/` (peft adapter over the aligned LLaVA, for vLLM's LoRA path; only with
LoRA) and `projector.safetensors` beside it, `merged/` (a complete LLaVA directory with the adapter
merged in) unless `lvlm.sft_save` keeps the adapter only (a real LM: one full copy less per generation;
annotation then loads the aligned LLaVA + adapter), `log.jsonl` (per step loss) and `info.json`.
On a GPU the LLaVA loads in bf16 (`lvlm.dtype`) and what trains is upcast to fp32;
`lvlm.sft_gradient_checkpointing` recomputes the LM's activations in the backward pass.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from safetensors.torch import save_file

from ..annotate.schema import render_input
from ..config import LoraConfig, RunConfig, sft_adapter_only
from ..device import free_accelerator_memory, resolve_device
from ..store import Store
from .align import text_budget
from .assemble import load_lvlm, lvlm_dtype, write_lvlm
from .common import (
    LOSS_PROBE_BATCHES,
    LVLMError,
    checkpointing,
    eval_loss,
    finish,
    is_writer,
    read_info,
    seed_everything,
    staging_dir,
    train_loop,
)
from .data import Example, emoji_alt_text_fn, make_batches, sft_examples, sft_input

LM_PREFIX = "model.language_model."
PROJECTOR_FILE = "projector.safetensors"  # beside the adapter: `multi_modal_projector.*` of the aligned LLaVA


def lora_target_pattern(names: list[str]) -> str:
    """A peft `target_modules` regex (full match on module names) for the LM's projections only
    (`names` non-empty: checked by `cycle.config`)."""
    return re.escape(LM_PREFIX) + r".*\.(" + "|".join(re.escape(n) for n in names) + r")"


def with_lora(model, cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        bias="none",
        target_modules=lora_target_pattern(list(cfg.target_modules)),
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        raise LVLMError(
            f"config key 'lvlm.lora.target_modules': {list(cfg.target_modules)} match no module "
            f"of the LM ({str(err).splitlines()[0]})"
        ) from None


def sft(
    lvlm_dir: str | Path,
    store: Store,
    samples_version,
    teacher_version,
    cfg: RunConfig,
    out_dir: str | Path,
    extra_records: Optional[list[dict]] = None,
    progress: bool = True,
    alt_text_fn: Optional[Callable[[Example, int], Optional[str]]] = None,
) -> tuple[Optional[Path], Optional[Path], dict]:
    """SFT of the aligned LLaVA in `lvlm_dir`. Returns (adapter dir or None, merged dir or None, metrics):
    no merged dir when `lvlm.sft_save` keeps the adapter only (`config.sft_adapter_only`).

    `extra_records`: more (id + four formulas) targets beyond the teacher table. `alt_text_fn(example, epoch)`
    may return a fresh alt-text for an example each epoch (None keeps the stored one); by default, with
    `lvlm.sft_fresh_alt_text` on emoji-scenes data, the dataset's own noise drawn anew. Always trains;
    `out_dir` is replaced atomically.
    """
    stage, lora = cfg.lvlm.sft, cfg.lvlm.lora
    out_dir = Path(out_dir)
    if alt_text_fn is None and cfg.lvlm.sft_fresh_alt_text and cfg.data.source == "emoji-scenes":
        alt_text_fn = emoji_alt_text_fn(cfg.data.emoji, cfg.seed)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    base, processor = load_lvlm(lvlm_dir, device, lvlm_dtype(cfg.lvlm.dtype, device))
    base.requires_grad_(False)
    if cfg.lvlm.sft_gradient_checkpointing:
        checkpointing(base, True)
    if lora.enabled:
        model = with_lora(base, lora)  # peft keeps the adapter weights in fp32 over a bf16 base
    else:
        model = base
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights for what trains (AdamW on bf16 weights loses small updates)
        p.data = p.data.float()
    examples = sft_examples(store, samples_version, teacher_version, extra_records)
    render = partial(render_input, processor)
    budget = text_budget(cfg, base)
    batches, steps = make_batches(
        examples, processor, stage.batch_size, cfg.seed, budget, sft_input(alt_text_fn, render=render)
    )
    plain = make_batches(examples, processor, stage.batch_size, cfg.seed, budget, sft_input(render=render))[0]
    before = eval_loss(model, plain(0), device, LOSS_PROBE_BATCHES)
    tmp = staging_dir(out_dir) if is_writer() else None  # data-parallel workers: rank 0 writes
    losses = train_loop(
        model,
        params,
        batches,
        stage.epochs,
        steps,
        stage.lr,
        stage.warmup_steps,
        device,
        "SFT" + (" (LoRA)" if lora.enabled else " (full LM)"),
        progress,
        log_path=tmp and tmp / "log.jsonl",
    )
    after = eval_loss(model, plain(0), device, LOSS_PROBE_BATCHES)
    metrics = {
        "sft/examples": len(examples),
        "sft/epochs": stage.epochs,
        "sft/trainable_params": sum(p.numel() for p in params),
        "sft/loss_before": before,
        "sft/loss_after": after,
        "sft/epoch_loss_first": losses[0],
        "sft/epoch_loss_last": losses[-1],
        "sft/truncated": len(batches.truncated),
    }
    if tmp is None:
        del model, base
        free_accelerator_memory()
        return None, None, metrics
    model.to("cpu")
    if cfg.lvlm.sft_gradient_checkpointing:
        checkpointing(base, False)
    adapter_only = sft_adapter_only(cfg.lvlm)
    if lora.enabled:
        model.save_pretrained(tmp / "adapter")
        # the projector beside the adapter: with the adapter it is all this generation changed over the LM
        save_file(
            {k: v.contiguous() for k, v in base.model.multi_modal_projector.state_dict().items()},
            tmp / PROJECTOR_FILE,
            metadata={"format": "pt"},
        )
    if not adapter_only:
        merged = model.merge_and_unload() if lora.enabled else model
        write_lvlm(merged, processor, tmp / "merged", link_from=[lvlm_dir])  # the tower: a link
    finish(
        tmp, out_dir, {"base": str(lvlm_dir), "metrics": metrics, "epoch_losses": losses, "adapter_only": adapter_only}
    )
    del model, base
    free_accelerator_memory()
    return sft_outputs(out_dir)


def sft_outputs(out_dir: str | Path) -> tuple[Optional[Path], Optional[Path], dict]:
    """(adapter dir or None, merged dir or None, metrics) of a finished SFT output folder."""
    out_dir = Path(out_dir)
    info = read_info(out_dir)
    adapter, merged = out_dir / "adapter", out_dir / "merged"
    return (adapter if adapter.is_dir() else None), (None if info["adapter_only"] else merged), info["metrics"]
