"""Annotation backends: `transformers` (in-process), `openai` (any OpenAI-compatible endpoint), `vllm`.

See `base` for the interface; `make_backend(cfg, model_dir, out_dir)` picks one from the config. The
factory lives here, above the concrete backends, so none of them imports the module that imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .base import Backend, BackendError, FailedGeneration

__all__ = ["Backend", "BackendError", "FailedGeneration", "make_backend"]


def make_backend(
    cfg: Any,
    model_dir: Optional[str | Path],
    out_dir: Optional[str | Path] = None,
    device: str = "auto",
    lora_dir: Optional[str | Path] = None,
) -> Backend:
    """The backend `cfg.backend` names (an `AnnotateConfig`, checked by `cycle.config`), for the model in
    `model_dir`; `device` is the run's `device` setting."""
    if cfg.backend == "transformers":
        from .transformers_backend import TransformersBackend

        return TransformersBackend(
            model_dir,
            device=device,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            kv_cache=cfg.kv_cache,
            lora_dir=lora_dir,
        )
    if cfg.backend == "openai":
        from .openai_backend import OpenAIBackend

        log = Path(out_dir) / "requests.jsonl" if out_dir else None
        return OpenAIBackend(
            cfg.openai, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, request_log=log
        )
    if cfg.backend == "vllm":
        from .vllm_backend import VLLMBackend

        return VLLMBackend(cfg, model_dir, lora_dir=lora_dir, out_dir=out_dir, device=device)
    raise ValueError(f"annotate.backend: unknown backend {cfg.backend!r}")  # load_config refuses it first
