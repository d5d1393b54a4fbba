"""Stage 1, alignment: teach the fresh projector to turn CLIP_{g-1}'s image tokens into LM input.

Only the projector trains; the vision tower and the LM stay frozen (as in LLaVA's stage 1). The data is
(image -> description) over the seed set, `desc` sentences joined, plus optionally `extra_ids` samples
captioned by their own alt-text and `extra_records` (the previous generation's best-scored annotations)
captioned by their `desc`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..config import RunConfig
from ..device import free_accelerator_memory, resolve_device
from ..store import Store
from .assemble import load_lvlm, lvlm_dtype, save_lvlm
from .common import (
    LOSS_PROBE_BATCHES,
    checkpointing,
    eval_loss,
    is_writer,
    read_info,
    seed_everything,
    train_loop,
)
from .data import align_examples, align_input, make_batches


def text_budget(cfg: RunConfig, model) -> int:
    """Tokens per training sequence: the image's tokens plus `lvlm.lm.max_length` of text."""
    return int(model.config.image_seq_length) + cfg.lvlm.lm.max_length


def align_projector(
    lvlm_dir: str | Path,
    store: Store,
    samples_version,
    teacher_version,
    cfg: RunConfig,
    out_dir: str | Path,
    extra_ids: Optional[Iterable[str]] = None,
    extra_records: Optional[list[dict]] = None,
    progress: bool = True,
) -> tuple[Path, dict]:
    """Train the projector of the LLaVA in `lvlm_dir`; save the whole LLaVA to `out_dir` (its LM and tower
    files hard links to `lvlm_dir`'s: only the projector changed).

    Returns (out_dir, metrics); `out_dir` is replaced atomically, its `info.json` holds the metrics.
    """
    stage = cfg.lvlm.align
    extra = sorted(set(extra_ids or ()))
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model, processor = load_lvlm(lvlm_dir, device, lvlm_dtype(cfg.lvlm.dtype, device))
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.float()  # fp32 master weights over a bf16 LLaVA: autocast runs the matmuls in bf16 anyway
    projector.requires_grad_(True)
    if cfg.lvlm.align_gradient_checkpointing:
        checkpointing(model, True)
    examples = align_examples(store, samples_version, teacher_version, extra, extra_records)
    batches, steps = make_batches(examples, processor, stage.batch_size, cfg.seed, text_budget(cfg, model), align_input)
    before = eval_loss(model, batches(0), device, LOSS_PROBE_BATCHES)
    losses = train_loop(
        model,
        list(projector.parameters()),
        batches,
        stage.epochs,
        steps,
        stage.lr,
        stage.warmup_steps,
        device,
        "align projector",
        progress,
    )
    after = eval_loss(model, batches(0), device, LOSS_PROBE_BATCHES)
    if cfg.lvlm.align_gradient_checkpointing:
        checkpointing(model, False)
    by_source = {f"align/examples_{s}": sum(e.source == s for e in examples) for s in ("seed", "previous", "alt_text")}
    metrics = {
        "align/examples": len(examples),
        "align/epochs": stage.epochs,
        **by_source,
        "align/loss_before": before,
        "align/loss_after": after,
        "align/epoch_loss_first": losses[0],
        "align/epoch_loss_last": losses[-1],
        "align/truncated": len(batches.truncated),
    }
    out = None
    if is_writer():  # data-parallel workers: rank 0 writes
        out = save_lvlm(
            model.to("cpu"),
            processor,
            out_dir,
            {"base": str(lvlm_dir), "metrics": metrics, "epoch_losses": losses},
            link_from=[lvlm_dir],
        )
    del model
    free_accelerator_memory()
    return out, metrics


def align_outputs(out_dir: str | Path) -> tuple[Path, dict]:
    """(out_dir, metrics) of a finished alignment output folder."""
    return Path(out_dir), read_info(out_dir)["metrics"]
