"""Optimizer, learning-rate setting, logit-scale clamp and the DeepSpeed config of CLIP training.

(The schedule itself, `cosine_lr`, is shared by every trainer: `cycle.schedule`.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's temperature floor of 0.01
NEVER = 2**31 - 1  # a step count no run reaches: DeepSpeed's own step printing stays off (the trainer logs)


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms, the logit scale and embeddings are not decayed (open_clip's rule, plus embeddings)."""
    return (
        param.ndim < 2
        or "bias" in name
        or "ln" in name
        or "norm" in name
        or "bn" in name
        or "logit_scale" in name
        or "embedding" in name
    )


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # A torch AdamW, not DeepSpeed's config optimizer: that one JIT-compiles a fused Adam for minutes on CPU.
    return torch.optim.AdamW(
        param_groups(module, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clamp_logit_scale(logit_scale: nn.Parameter) -> None:
    """Clamp the learnable log-temperature to [0, ln 100] after a step, in the optimizer's master copy too.

    Under ZeRO the optimizer keeps its own fp32 copy of each parameter and writes it back after every
    step; clamping only the module's tensor (what plain open_clip does) would be undone by the next step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    with torch.no_grad():
        master = safe_get_full_fp32_param(logit_scale)
        if master is not None:
            safe_set_full_fp32_param(logit_scale, master.clamp(0, LOGIT_SCALE_MAX))
        logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def deepspeed_config(cfg: TrainConfig, micro_batch: int, accum_steps: int, world_size: int, bf16: bool) -> dict:
    """DeepSpeed's config for these sizes; `train.zero_stage` is 1 or 2 (checked by config validation)."""
    return {
        "train_batch_size": micro_batch * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        # The trainer owns the step boundary: feature-cache accumulation backpropagates each micro-batch
        # through a loss over the whole batch, so nothing may be divided by the accumulation steps.
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.grad_clip or 0.0),
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": False},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
