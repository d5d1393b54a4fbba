"""Structured configuration for a run: one dataclass per part, YAML files, `key=value` overrides.

`load_config(path, overrides)` is the one entry point. Anything wrong (unknown key, wrong type, missing
required value, a bad choice) raises `ConfigError` with one line naming the key and what was expected.
`fingerprint(section)` is the stable hash the controller records for each stage's inputs.
The schema (what each key means, its default) is `schema.py`; every check of a merged config is `checks.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..files import write_text_atomic
from .checks import check_clip_name, check_emoji, launcher_world_size, validate
from .schema import (
    AltNoiseConfig,
    AnnotateConfig,
    CarryConfig,
    ClipModelConfig,
    ClusterAnnotateConfig,
    ClusterConfig,
    ClusterLvlmConfig,
    ConfigError,
    CycleConfig,
    DataConfig,
    EmojiScenesConfig,
    EvalConfig,
    LMConfig,
    LoraConfig,
    LossConfig,
    LVLMConfig,
    OpenAIBackendConfig,
    RunConfig,
    StageConfig,
    StoreConfig,
    TrainConfig,
    VLLMBackendConfig,
    carried_stage,
    epochs_of,
    sft_adapter_only,
    to_dict,
    trained_generation,
)

__all__ = [
    "AltNoiseConfig",
    "AnnotateConfig",
    "CarryConfig",
    "ClipModelConfig",
    "ClusterAnnotateConfig",
    "ClusterConfig",
    "ClusterLvlmConfig",
    "ConfigError",
    "CycleConfig",
    "DataConfig",
    "EmojiScenesConfig",
    "EvalConfig",
    "LMConfig",
    "LVLMConfig",
    "LoraConfig",
    "LossConfig",
    "OpenAIBackendConfig",
    "RunConfig",
    "StageConfig",
    "StoreConfig",
    "TrainConfig",
    "VLLMBackendConfig",
    "carried_stage",
    "check_clip_name",
    "check_emoji",
    "epochs_of",
    "fingerprint",
    "launcher_world_size",
    "load_config",
    "save_config",
    "sft_adapter_only",
    "to_dict",
    "to_yaml",
    "trained_generation",
]


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).split("\n")[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Schema <- YAML file <- `key=value` overrides, validated. Returns a typed `RunConfig`."""
    try:
        cfg = OmegaConf.structured(RunConfig)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as err:  # a syntax error: say where, in one line
                mark = getattr(err, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"config key '{missing[0]}': a value is required (set it in the file or as {missing[0]}=...)"
            )
        validate(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config sections and other JSON-able inputs (paths, versions, hashes)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, run_dir: str | Path) -> str:
    """Write the resolved config with its fingerprint into the run directory; returns the fingerprint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    text = f"# fingerprint: {fp}\n" + to_yaml(cfg)
    write_text_atomic(run_dir / "config.yaml", text)
    return fp
