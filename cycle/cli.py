"""`hqclip`: the command line. Thin: parse, load config, call one stage or the controller, print."""
from __future__ import annotations

import sys

import click

from .config import ConfigError, load_config


def config_from(config_path, overrides):
    try:
        return load_config(config_path, list(overrides))
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hqclip-cycle")
def main():
    """Run generations of the HQ-CLIP cycle: CLIP -> LVLM annotator -> better data -> better CLIP."""


@main.group()
def data():
    """Build the built-in dataset, ingest your own, list what a run holds."""


if __name__ == "__main__":
    sys.exit(main())
