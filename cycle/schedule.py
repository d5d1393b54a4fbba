"""The learning-rate schedule of every trainer (CLIP, LM pretraining, alignment, SFT)."""

from __future__ import annotations

import math


def cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `base_lr` over `warmup_steps`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span)) * base_lr
