"""The CLIP model factory and the checkpoint format every stage reads and writes.

One entry point, `create_clip(name)`: any open_clip architecture by name, or one of our small configs in
`model_configs/` (registered with open_clip, so open_clip itself can build them too). Model configs are
data; nothing here knows their sizes.

A checkpoint is a directory that open_clip loads by itself offline
(`open_clip.create_model_and_transforms("local-dir:PATH")`):

    open_clip_config.json         {"model_name", "model_cfg", "preprocess_cfg"}
    open_clip_model.safetensors   the CLIP state dict
    <name>.safetensors / <name>.json   optional extras (the trainer's `stc_head` and `tag_vocab`)
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager, nullcontext
import shutil
import tempfile
from copy import deepcopy
from pathlib import Path
from typing import Any, Optional

import open_clip
from open_clip.factory import parse_model_name
import torch
from safetensors.torch import load_file, save_file

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

_registered = False


class CheckpointError(ValueError):
    """A CLIP checkpoint directory that is missing, incomplete or unreadable; the message says which file."""


def register_model_configs() -> None:
    """Make our small architectures (hqclip-tiny, hqclip-micro, ...) known to open_clip by name. Idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_architectures() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@contextmanager
def _quiet_random_init():
    """open_clip warns "initialized randomly" whenever it loads no weights itself: expected here."""
    def drop(record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _resolve_pretrained(pretrained: Optional[str]) -> Optional[str]:
    """A checkpoint directory of ours becomes its weights file; tags and file paths go to open_clip as given."""
    if pretrained and Path(pretrained).is_dir():
        weights = Path(pretrained) / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"pretrained directory '{pretrained}' has no {WEIGHTS_FILE}")
        return str(weights)
    return pretrained


def create_clip(name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu",
                image_size: Optional[int] = None):
    """Build a CLIP by architecture name. Returns (model, preprocess_train, preprocess_val, tokenizer).

    `pretrained` is an open_clip tag (downloads: needs a hub), a weights file, or a checkpoint directory
    written by `save_clip`. `image_size` overrides the config's (ViT position embeddings are resized
    when pretrained weights are loaded). The logit scale is always a 1-element tensor: DeepSpeed
    cannot shard 0-dim parameters.
    """
    register_model_configs()
    schema, _ = parse_model_name(name)
    if schema is None and open_clip.get_model_config(name.replace("/", "-")) is None:
        raise ValueError(f"unknown CLIP architecture '{name}'; known: {', '.join(open_clip.list_models())}")
    with _quiet_random_init() if pretrained is None else nullcontext():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=_resolve_pretrained(pretrained), device=device, force_image_size=image_size,
            nonscalar_logit_scale=True,
        )
    tokenizer = open_clip.get_tokenizer(name)
    _remember(model, _plain_name(name), open_clip.get_model_config(name if schema else name.replace("/", "-")))
    return model, preprocess_train, preprocess_val, tokenizer


def _remember(model: torch.nn.Module, name: str, cfg: Optional[dict]) -> None:
    """What `save_clip` records when not told: the architecture name and the exact config it was built from."""
    model.hqclip_model_name = name
    model.hqclip_model_cfg = deepcopy(cfg)


def model_config_of(model: torch.nn.Module, model_name: Optional[str] = None) -> dict:
    """The open_clip model config that rebuilds `model`: the config it was built from (else the named
    one), with the image size and context length the model actually has."""
    register_model_configs()
    cfg = getattr(model, "hqclip_model_cfg", None)
    if cfg is None and model_name:
        cfg = open_clip.get_model_config(model_name.replace("/", "-") if ":" not in model_name else model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture '{model_name}'")
    cfg = deepcopy(cfg)
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", None)
    if size is not None and "timm_model_name" not in cfg["vision_cfg"]:
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg["vision_cfg"]["image_size"] = size[0] if size[0] == size[1] else list(size)
    if getattr(model, "context_length", None):
        cfg["text_cfg"]["context_length"] = int(model.context_length)
    return cfg


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DeepSpeed engines and DDP wrap the CLIP in `.module`."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def save_clip(model: torch.nn.Module, model_name: Optional[str], path: str | Path,
              extra_tensors: Optional[dict[str, dict[str, torch.Tensor]]] = None,
              extra_json: Optional[dict[str, Any]] = None) -> Path:
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
        _replace_dir(tmp, path)
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
                f"local-dir:{path}", load_weights=False, nonscalar_logit_scale=True)
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


def read_checkpoint_config(path: str | Path) -> dict:
    """The parsed `open_clip_config.json` of a checkpoint directory, with clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"CLIP checkpoint directory '{path}' does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"CLIP checkpoint '{path}' has no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"CLIP checkpoint '{path}': {CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise CheckpointError(f"CLIP checkpoint '{path}': {CONFIG_FILE} has no 'model_cfg' object")
    return config


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def _plain_name(model_name: str) -> str:
    schema, ident = parse_model_name(model_name)
    if schema == "local-dir":
        try:
            return read_checkpoint_config(ident).get("model_name") or model_name
        except CheckpointError:
            return model_name
    return model_name


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fsync(file: Path) -> None:
    with open(file, "rb") as fh:
        os.fsync(fh.fileno())


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`; an existing `dest` is moved aside first and removed after."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    new.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
