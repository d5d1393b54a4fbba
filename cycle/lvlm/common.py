"""Small pieces every LVLM stage shares: seeding, the stage error, atomic output directories, and one
training loop (AdamW, `cycle.schedule.cosine_lr`, progress bar, loss log).

Stages keep no completion record of their own: the controller's `state.json` is the only one. A stage
writes its whole output into a staging sibling and renames it into place, so a kill never leaves half.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from tqdm.auto import tqdm

from ..errors import HQClipError
from ..files import replace_dir, write_json_atomic
from ..schedule import cosine_lr

INFO_FILE = "info.json"  # what a stage saw and measured, for people; not a completion record
# A stage's loss before and after training is measured on the first this many batches of epoch 0's order
# (the same rows both times): enough to show it fell; the whole set cost up to a quarter of a short stage
# (two passes over it against two epochs of training in a carried generation's SFT).
LOSS_PROBE_BATCHES = 16


class LVLMError(HQClipError, ValueError):
    """Bad input to an LVLM stage (empty text, invalid seed records, an image that does not decode).

    Also a ValueError, so callers that caught the plain ValueError these used to be still do."""


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators, explicitly, at the start of a stage: weight init,
    dropout and LoRA init draw from them (batch order uses its own seeded generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def staging_dir(out_dir: str | Path) -> Path:
    """A fresh sibling directory to write into; `finish` renames it over `out_dir` once complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish(tmp: Path, out_dir: str | Path, info: Optional[dict] = None) -> Path:
    """Write `info.json` (when given), then swap the staging directory in: a kill leaves no half output."""
    out_dir = Path(out_dir)
    if info is not None:
        write_json_atomic(tmp / INFO_FILE, info)
    return replace_dir(tmp, out_dir)


def read_info(out_dir: str | Path) -> dict:
    """The `info.json` a finished stage wrote (what it saw and measured)."""
    return json.loads((Path(out_dir) / INFO_FILE).read_text())


def _autocast(device: torch.device, bf16_weights: bool = False):
    """bf16 autocast on GPU (weights stay fp32), and on the CPU over bf16 weights (`lvlm.dtype=bf16`: the fp32
    trainables there meet bf16 activations); plain fp32 on CPU otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" or bf16_weights)


def _has_bf16(model: torch.nn.Module) -> bool:
    return any(p.dtype == torch.bfloat16 for p in model.parameters())


# --- data parallelism: under Ray Train (`cluster.lvlm.workers` > 1) every worker builds the same global
# batches (same seed, same order, same padding) and runs its rows of each; the loss is weighted by target
# tokens over all workers, so the summed gradients equal one process's on the whole batch.
def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group this stage runs in; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_writer() -> bool:
    """Whether this process writes the stage's outputs (rank 0; the only process without a group)."""
    return rank_and_world()[0] == 0


def _my_rows(batch: dict, device: torch.device, rank: int, world: int) -> tuple[dict, int]:
    """This worker's rows of a global batch, on `device`, and the batch's target tokens over all workers.
    A worker left without rows (a last batch smaller than the world) gets row 0 without targets: it skips it."""
    rows = range(rank, batch["labels"].shape[0], world)
    index = torch.tensor(list(rows) or [0])
    mine = {k: v[index].to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if not rows:
        mine["labels"] = torch.full_like(mine["labels"], -100)
    return mine, _targets(batch)


def _targets(batch: dict) -> int:
    """Target tokens of a batch (the labels past the first position that are not ignored)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module, batches: Iterable[dict], device: torch.device, max_batches: Optional[int] = None
) -> float:
    """Mean loss over `batches` (the first `max_batches` of them), weighted by target tokens, in eval mode
    (no dropout); over all workers."""
    batches = itertools.islice(batches, max_batches)
    was_training = model.training
    model.eval()
    rank, world = rank_and_world()
    total, tokens = 0.0, 0
    bf16 = _has_bf16(model)
    for batch in batches:
        batch, _ = _my_rows(batch, device, rank, world)
        n = _targets(batch)
        if n:
            with _autocast(device, bf16):
                loss = model(**batch).loss
            total, tokens = total + loss.item() * n, tokens + n
    if world > 1:
        total, tokens = _all_sum([total, tokens], device)
    model.train(was_training)
    return total / max(1, tokens)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The shared schedule as a factor on the optimizer's lr (LambdaLR multiplies, as before)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, 1.0, warmup, total))


def train_loop(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: Callable[[int], Iterable[dict]],
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    warmup: int,
    device: torch.device,
    desc: str,
    progress: bool = True,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    log_path: Optional[Path] = None,
) -> list[float]:
    """Train `params` of `model` on `batches(epoch)` (dicts of model inputs incl. `labels`).

    Returns the mean loss of every epoch; with `log_path`, one JSON line per step (epoch, step, loss, lr).
    In a process group (Ray Train workers) each worker runs its rows of every batch and the gradients are
    summed over the workers, token-weighted: the same update as one process on the whole batch.
    """
    if not params:
        raise ValueError(f"{desc}: no trainable parameters")  # a bug in the caller, not a user input
    rank, world = rank_and_world()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, warmup, epochs * steps_per_epoch)
    model.train()
    bf16 = _has_bf16(model)
    epoch_losses: list[float] = []
    step = 0
    with (
        open(log_path if log_path and rank == 0 else os.devnull, "w") as log,
        tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress or rank > 0, unit="step") as bar,
    ):
        for epoch in range(epochs):
            total, n = 0.0, 0
            for batch in batches(epoch):
                batch, tokens = _my_rows(batch, device, rank, world)
                mine = _targets(batch)
                optimizer.zero_grad(set_to_none=True)
                if mine:
                    with _autocast(device, bf16):
                        loss = model(**batch).loss * (mine * world / tokens)
                    loss.backward()
                else:  # no target token here: nothing to learn from, and the model's mean would be 0/0
                    loss = torch.zeros((), device=device)
                if world > 1:  # each worker's loss is its share of the batch's: the sum is the batch's mean
                    _sum_gradients(params, world)
                    loss = torch.tensor(_all_sum([loss.item()], device)[0] / world)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                scheduler.step()
                step, total, n = step + 1, total + loss.item(), n + 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
                log.write(
                    json.dumps({"epoch": epoch, "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]})
                    + "\n"
                )
            epoch_losses.append(total / max(1, n))
    model.eval()
    return epoch_losses


def _sum_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the workers' gradients (each loss was scaled by `world`, so the mean is the token-weighted sum)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def checkpointing(model, enabled: bool) -> None:
    """Gradient checkpointing on (training: layers recompute their activations in the backward pass) or
    off again (before saving: the saved config must let annotation use its KV cache). Non-reentrant, so
    gradients reach the projector or LoRA weights through frozen layers whose inputs need none."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.config.use_cache = not enabled
