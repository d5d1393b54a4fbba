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

# ------------------------------------------------------------------------------------------ the cycle
def _run_dir_arg(run):
    from pathlib import Path

    path = Path(run)
    if not (path / "state.json").exists():
        raise click.ClickException(f"{path} is not a run directory (no state.json): run `hqclip run CONFIG` first")
    return path


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--from", "redo_from", metavar="GEN:STAGE", help="Redo from this stage on (e.g. 1:annotate).")
@click.option("--stop-after", metavar="GEN:STAGE", help="Stop once this stage is done.")
def run(config_path, overrides, redo_from, stop_after):
    """Run generation 0 and the configured generations; the same command again resumes.

    OVERRIDES are key=value pairs, e.g. `cycle.generations=3 train.epochs=5 name=myrun`.
    """
    from rich.console import Console

    from .controller import ConfigChanged, run_cycle
    from .state import RunLocked
    from .status import print_status

    cfg = config_from(config_path, overrides)
    console = Console()
    try:
        run_cycle(cfg, redo_from=redo_from, stop_after=stop_after, log=lambda m: console.print(f"[bold]{m}[/]"))
    except (ConfigChanged, RunLocked, ValueError) as err:
        raise click.ClickException(str(err)) from None
    print_status(cfg.run_dir, console)
    console.print(f"run directory: {cfg.run_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def status(run_dir):
    """A table of generations x stages: state, duration, rows, key metrics."""
    from .status import print_status

    print_status(_run_dir_arg(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gen", "gens", type=int, multiple=True, help="Generation(s) to show (default: all).")
@click.option("--id", "ids", multiple=True, help="Sample id(s).")
@click.option("--sample", type=int, default=0, help="Show K random samples.")
@click.option("--where", help="A SQL filter on samples, e.g. \"split = 'train'\".")
@click.option("--image-out", type=click.Path(file_okay=False), help="Write the images into this folder.")
def inspect(run_dir, gens, ids, sample, where, image_out):
    """Samples with their alt-text and the four formulas, side by side across generations."""
    from pathlib import Path

    from .config import load_config
    from .controller import store_of
    from .state import RunState
    from .status import print_samples, samples_across_generations

    run_dir = _run_dir_arg(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if not (ids or sample or where):
        sample = 3
    rows = samples_across_generations(store_of(cfg), RunState(run_dir), ids=ids, sample=sample, where=where,
                                      gens=list(gens) or None)
    if not rows:
        raise click.ClickException("no sample matches")
    print_samples(rows, image_out=Path(image_out) if image_out else None)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gallery", type=int, default=12, help="Images in the gallery.")
def report(run_dir, gallery):
    """Write RUN/report/index.html: metrics, plots, loss curves, annotation stats, a gallery."""
    from .config import load_config
    from .controller import store_of
    from .report import write_report

    run_dir = _run_dir_arg(run_dir)
    page = write_report(run_dir, store_of(load_config(run_dir / "config.yaml")), gallery=gallery)
    click.echo(f"report: {page}")


@main.command()
@click.argument("overrides", nargs=-1)
@click.option("--config", "config_path", default=None, help="Default: configs/emoji.yaml of this checkout.")
def demo(overrides, config_path):
    """The demo: generation 0 plus two generations on the built-in emoji scenes, then status and report."""
    from pathlib import Path

    from .controller import run_cycle, store_of
    from .report import write_report
    from .status import print_status

    path = Path(config_path) if config_path else Path(__file__).resolve().parents[1] / "configs" / "emoji.yaml"
    cfg = config_from(path, overrides)
    run_cycle(cfg)
    print_status(cfg.run_dir)
    click.echo(f"report: {write_report(cfg.run_dir, store_of(cfg))}")

@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gen", type=int, required=True, help="The generation to export.")
@click.option("--out", type=click.Path(file_okay=False), help="Default: RUN/export/gen-GGG.")
@click.option("--what", type=click.Choice(["clip", "lvlm", "data"]), multiple=True, help="Default: all three.")
@click.option("--data-format", type=click.Choice(["json", "wds"]), default="json",
              help="VLM-150M JSON files or webdataset shards.")
def export(run_dir, gen, out, what, data_format):
    """Export a generation: the CLIP (open_clip + HF), the LVLM (merged HF dir), the dataset."""
    from pathlib import Path

    from .config import load_config
    from .controller import store_of
    from .export import export_generation

    run_dir = _run_dir_arg(run_dir)
    out = Path(out) if out else run_dir / "export" / f"gen-{gen:03d}"
    try:
        done = export_generation(store_of(load_config(run_dir / "config.yaml")), run_dir, gen, out,
                                 tuple(what) or ("clip", "lvlm", "data"), data_format)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    for key, value in done.items():
        click.echo(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(main())
