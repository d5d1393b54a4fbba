"""Annotation backends: `transformers` (in-process), `openai` (any OpenAI-compatible endpoint), `vllm`.

See `base` for the interface; `make_backend(cfg, model_dir, out_dir)` picks one from the config.
"""
from .base import Backend, BackendError, FailedGeneration, make_backend

__all__ = ["Backend", "BackendError", "FailedGeneration", "make_backend"]
