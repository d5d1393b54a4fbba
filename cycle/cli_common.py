"""What every command group shares: loading a config with a one-line error."""
from __future__ import annotations

import click

from .config import ConfigError, load_config


def config_from(config_path, overrides):
    try:
        return load_config(config_path, list(overrides))
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


def run_config(run_dir, config_path=None, overrides=()):
    """A run's config for a command that works on RUN_DIR: --config, else RUN/config.yaml, else the
    defaults, named after the directory; `overrides` apply on top."""
    from pathlib import Path

    path = Path(config_path) if config_path else Path(run_dir) / "config.yaml"
    chosen = path if config_path or path.is_file() else None  # a --config that is missing is an error
    return config_from(chosen, [f"name={Path(run_dir).name}", *overrides])


def pinned_data(run_dir) -> dict:
    """The data stage's pinned versions of a run (samples_version, seed_version), {} before it ran."""
    from pathlib import Path

    from .state import RunState

    if not (Path(run_dir) / "state.json").is_file():
        return {}
    return RunState(run_dir).stage(0, "data").get("outputs", {})
