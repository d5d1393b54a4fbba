"""A saved CLIP: the checkpoint directory every stage reads and writes, loadable by open_clip alone
offline (`open_clip.create_model_and_transforms("local-dir:PATH")`):

    open_clip_config.json         {"model_name", "model_cfg", "preprocess_cfg"}
    open_clip_model.safetensors   the CLIP state dict
    <name>.safetensors / <name>.json   optional extras (the trainer's `stc_head` and `tag_vocab`)

Weights are read with safetensors only: nothing in a checkpoint directory is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch
from safetensors.torch import load_file, save_file

from ..files import replace_dir
from .model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    _plain_name,
    _quiet_random_init,
    _remember,
    model_config_of,
    read_checkpoint_config,
    register_model_configs,
)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DeepSpeed engines and DDP wrap the CLIP in `.module`."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def save_clip(
    model: torch.nn.Module,
    model_name: Optional[str],
    path: str | Path,
    extra_tensors: Optional[dict[str, dict[str, torch.Tensor]]] = None,
    extra_json: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a checkpoint directory (see the module doc). Atomic: written aside, then renamed into place.

    `extra_tensors` maps a file stem to a state dict (`{"stc_head": head.state_dict()}` ->
    `stc_head.safetensors`); `extra_json` maps a file stem to a JSON-able value (`{"tag_vocab": [...]}`).
    """
    model = _unwrap(model)
    model_name = model_name or getattr(model, "hqclip_model_name", None)
    if not model_name:
        raise ValueError("save_clip needs the architecture name (model_name)")
    model_cfg = model_config_of(model, model_name)
    reserved = {Path(CONFIG_FILE).stem, Path(WEIGHTS_FILE).stem}
    for stem in [*(extra_tensors or {}), *(extra_json or {})]:
        if stem in reserved or "/" in stem or stem.startswith("."):
            raise ValueError(f"extra file name '{stem}' is reserved or not a plain name")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        for stem, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / f"{stem}.safetensors")
        for stem, value in (extra_json or {}).items():
            (tmp / f"{stem}.json").write_text(json.dumps(value, indent=1, ensure_ascii=False))
        preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        config = {
            "model_name": _plain_name(model_name),
            "model_cfg": model_cfg,
            "preprocess_cfg": _jsonable(preprocess),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        for f in tmp.iterdir():
            _fsync(f)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_clip(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint directory. Returns (model in eval mode, preprocess_val, tokenizer, extras).

    `extras` holds every other file of the directory by stem: `*.safetensors` as tensor dicts,
    `*.json` as parsed values (e.g. `extras["stc_head"]`, `extras["tag_vocab"]`). Weights are read
    with safetensors only.
    """
    path = Path(path)
    config = read_checkpoint_config(path)
    if not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"CLIP checkpoint '{path}' has no {WEIGHTS_FILE}")
    register_model_configs()
    try:
        # Built from the directory's config, weights loaded here strictly: open_clip's own loader would
        # silently resize a position embedding that does not match the config.
        with _quiet_random_init():
            model, _, preprocess_val = open_clip.create_model_and_transforms(
                f"local-dir:{path}", load_weights=False, nonscalar_logit_scale=True
            )
        state = load_file(path / WEIGHTS_FILE)
        if "logit_scale" in state:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"CLIP checkpoint '{path}' does not load: {str(err).splitlines()[0]}") from err
    model.to(device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    _remember(model, config.get("model_name") or str(path), config["model_cfg"])
    model.eval()
    extras: dict[str, Any] = {}
    for f in sorted(path.iterdir()):
        if f.name in (CONFIG_FILE, WEIGHTS_FILE) or f.name.startswith("."):
            continue
        try:
            if f.suffix == ".safetensors":
                extras[f.stem] = load_file(f, device=str(device))
            elif f.suffix == ".json":
                extras[f.stem] = json.loads(f.read_text())
        except Exception as err:  # a corrupt extra names itself; the CLIP itself loaded fine
            raise CheckpointError(f"CLIP checkpoint '{path}': extra file {f.name} is unreadable: {err}") from err
    return model, preprocess_val, tokenizer, extras


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())
