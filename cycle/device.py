"""Which torch device a run's `device` setting means: the one place that decides it."""

from __future__ import annotations

from .errors import HQClipError


def resolve_device(device: str = "auto", local_rank: int | None = None):
    """ "auto" takes CUDA when present, else the CPU; "cuda" without a GPU is an error, not a silent CPU run.

    `local_rank` picks (and makes current) that GPU of the node for a training rank.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HQClipError(f"device '{device}' was asked for but no CUDA GPU is available (set device=cpu or auto)")
        if local_rank is not None:
            torch.cuda.set_device(local_rank)
            return torch.device("cuda", local_rank)
    return torch.device(device)


def free_accelerator_memory() -> None:
    """Between in-process stages: drop unreachable tensors and hand cached CUDA blocks back, so the next
    stage (another model) starts from an empty GPU. A no-op without torch loaded or without CUDA."""
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
