"""The LVLM annotator: a LLaVA whose vision tower is the current generation's CLIP.

Stages, each a plain function from explicit inputs to a directory on disk. Each always does its work
and writes `out` atomically; whether an earlier output may be reused is the controller's decision
(`state.json`), never the stage's:

    pretrain_lm(cfg.lvlm.lm, texts, out, seed, device)         -> LM dir (tiny: tokenizer + LM trained here)
    prepare_lm(cfg.lvlm.lm, run_texts(store, sv, teacher_v), out)  -> pretrain_lm's dir, or the hub LM's name
    build_lvlm(clip_dir, lm_dir, cfg.lvlm, out)                 -> LLaVA dir (tower = CLIP_{g-1}'s ViT)
    align_projector(lvlm_dir, store, sv, teacher_v, cfg, out)       -> (LLaVA dir, metrics): projector only
    sft(aligned_dir, store, sv, teacher_v, cfg, out)                -> (adapter dir | None, merged dir, metrics)

Imports are lazy: `import cycle.lvlm` stays cheap; the names load their module on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prepare_lm": "lm",
    "pretrain_lm": "lm",
    "run_texts": "lm",
    "build_lvlm": "assemble",
    "load_lvlm": "assemble",
    "save_lvlm": "assemble",
    "align_projector": "align",
    "sft": "finetune",
    "best_previous_annotations": "data",
    "alt_text_caption_ids": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
