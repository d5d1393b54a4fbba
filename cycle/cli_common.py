"""What every command group shares: the error boundary, logging, config files by path or shipped name,
and a run directory's config and pinned data versions."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from .config import ConfigError, load_config
from .errors import HQClipError

# The YAML configs shipped inside the package (`configs/` at the top of a checkout links here).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"
LOG_LEVEL_ENV = "HQCLIP_LOG_LEVEL"
USER_ERROR_EXIT_CODE = 2  # like click's usage errors: the command was given something it cannot use


def one_line(err: BaseException) -> str:
    """The error's message on one line (a wrapped message's lines joined), never empty."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


class HQClipGroup(click.Group):
    """The root command group, and the one place user errors are caught: any `HQClipError` raised by a
    command (or anything it calls) prints one red line and exits with code 2, no traceback. Click's own
    usage errors are raised before this and keep their usual message; any other exception is a bug and
    keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HQClipError as err:
            self._fail(ctx, err)

    @staticmethod
    def _fail(ctx: click.Context, err: BaseException):
        click.secho(f"error: {one_line(err)}", fg="red", err=True)
        ctx.exit(USER_ERROR_EXIT_CODE)


def setup_logging(level: str | None = None) -> None:
    """Log records of `cycle.*` to stderr through rich (markup off: messages carry data such as alt-text
    and "[gen 1]" prefixes, printed as they are). Level: the argument, else $HQCLIP_LOG_LEVEL, else INFO."""
    from rich.console import Console
    from rich.logging import RichHandler

    name = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ConfigError(
            f"log level '{level or os.environ.get(LOG_LEVEL_ENV)}': expected one of DEBUG, INFO, WARNING, ERROR"
        )
    logger = logging.getLogger("cycle")
    for old in [h for h in logger.handlers if getattr(h, "hqclip_cli", False)]:
        logger.removeHandler(old)  # a second call (tests invoke the CLI many times) replaces, never adds
    handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False, rich_tracebacks=False)
    handler.hqclip_cli = True
    logger.addHandler(handler)
    logger.setLevel(name)
    logger.propagate = False  # a library that configured the root logger would print every line twice


def config_file(name_or_path: str | Path) -> Path:
    """A config given as a path, or by the name of a shipped config (`emoji`, `tiny.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file '{name_or_path}' does not exist (nor is it a shipped config: {names})")


# What launchers append to the program's arguments: the `deepspeed` launcher adds `--local_rank=N` (torch's
# old launch utility `--local-rank N`); each rank reads LOCAL_RANK from its environment instead.
LAUNCHER_ARGS = ("--local_rank", "--local-rank")


def without_launcher_args(args) -> list[str]:
    """`args` without a launcher's `--local_rank=N` / `--local_rank N` (not config overrides)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in LAUNCHER_ARGS:
            skip = True  # its value is the next argument
        elif arg.split("=", 1)[0] not in LAUNCHER_ARGS:
            out.append(arg)
    return out


def config_from(config_path, overrides):
    """`load_config` of a path or shipped config name (None: the defaults) with `key=value` overrides
    (a launcher's `--local_rank` dropped from them)."""
    return load_config(config_file(config_path) if config_path is not None else None, without_launcher_args(overrides))


def run_config(run_dir, config_path=None, overrides=()):
    """A run's config for a command that works on RUN_DIR: --config, else RUN/config.yaml, else the
    defaults, named after the directory; `overrides` apply on top."""
    path = Path(config_path) if config_path else Path(run_dir) / "config.yaml"
    chosen = path if config_path or path.is_file() else None  # a --config that is missing is an error
    return config_from(chosen, [f"name={Path(run_dir).name}", *overrides])


def pinned_data(run_dir) -> dict:
    """The data stage's pinned versions of a run (samples_version, teacher_version), {} before it ran."""
    from .state import RunState

    if not (Path(run_dir) / "state.json").is_file():
        return {}
    return RunState(run_dir).outputs(0, "data")
