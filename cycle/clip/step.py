"""One optimisation step's forward and backward, with contrastive gradient accumulation by feature cache.

A contrastive loss needs every sample of the batch as a negative, so micro-batches cannot simply add up
their own losses. open_clip's `accum_freq` method, used here: first a no-grad forward of every micro-batch
caches its features; then each micro-batch is recomputed with gradient and the loss is taken over the whole
batch (its fresh features in place, the cached ones elsewhere); its backward adds exactly that micro-batch's
share of the full-batch gradient. The sum over micro-batches is the full-batch gradient.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .train_module import FEATURE_KEYS

# Per-sample inputs the loss reads directly (not through the model).
LOSS_INPUT_KEYS = ("neg_valid", "text_keys", "neg_keys", "tag_targets")


def split_micro_batches(inputs: dict[str, Tensor], micro_batch: int) -> list[dict[str, Tensor]]:
    n = next(iter(inputs.values())).shape[0]
    if n % micro_batch:
        raise ValueError(f"a batch of {n} does not split into micro-batches of {micro_batch}")
    return [{k: v[i:i + micro_batch] for k, v in inputs.items()} for i in range(0, n, micro_batch)]


def forward_backward(model: Callable[..., dict], loss_fn: Callable[..., dict], micro_batches: list[dict],
                     backward: Callable[[Tensor], object]) -> dict[str, Tensor]:
    """Forward and backward of one batch given as micro-batches; returns the loss terms (detached).

    `model(**micro_batch)` returns the `ClipWithTagHead` outputs; `loss_fn(**outputs, **loss_inputs)` the
    term dict; `backward(total)` is `loss.backward` or a DeepSpeed engine's `backward`.
    """
    if len(micro_batches) == 1:
        mb = micro_batches[0]
        losses = loss_fn(**model(**mb), **{k: mb[k] for k in LOSS_INPUT_KEYS if k in mb})
        backward(sum(losses.values()))
        return {k: v.detach() for k, v in losses.items()}

    with torch.no_grad():
        cached = [model(**mb) for mb in micro_batches]
    keys = [k for k in FEATURE_KEYS if k in cached[0]]
    cached = [{k: out[k] for k in keys} for out in cached]
    loss_inputs = {k: torch.cat([mb[k] for mb in micro_batches]) for k in LOSS_INPUT_KEYS if k in micro_batches[0]}
    for j, mb in enumerate(micro_batches):
        fresh = model(**mb)
        features = {k: torch.cat([c[k] for c in cached[:j]] + [fresh[k]] + [c[k] for c in cached[j + 1:]])
                    for k in keys}
        # The logit scale multiplies every logit, cached ones included: each pass would add the whole
        # batch's d(loss)/d(scale), so only the first pass lets it through (open_clip's accum_freq counts
        # it accum_freq times).
        scale = fresh["logit_scale"] if j == 0 else fresh["logit_scale"].detach()
        losses = loss_fn(**features, logit_scale=scale, **loss_inputs)
        backward(sum(losses.values()))
    return {k: v.detach() for k, v in losses.items()}
