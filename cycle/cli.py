"""`hqclip`: the command line. Thin: parse, load config, call one stage or the controller, print."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .cli_common import HQClipGroup, config_from, setup_logging
from .errors import HQClipError
from .files import check_writable_dir

log = logging.getLogger(__name__)
DEFAULT_DEMO_CONFIG = "emoji"  # a shipped config (cycle/configs/emoji.yaml)
DEFAULT_INSPECT_SAMPLES = 3  # samples `hqclip inspect` shows when no id, sample count or filter is given
ALL_EXPORTS = ("clip", "lvlm", "data")


@click.group(cls=HQClipGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hqclip-cycle")
@click.option(
    "--log-level",
    envvar="HQCLIP_LOG_LEVEL",
    default=None,
    metavar="LEVEL",
    help="DEBUG, INFO (default), WARNING or ERROR; also $HQCLIP_LOG_LEVEL.",
)
def main(log_level):
    """Run generations of the HQ-CLIP cycle: CLIP -> LVLM annotator -> better data -> better CLIP.

    CONFIG arguments take a path or the name of a shipped config (emoji, tiny, real-vitb16, real-7b-80gb).
    Problems with what was given (a config key, a file, a run directory) print one red line and exit
    with code 2.
    """
    setup_logging(log_level)


# ------------------------------------------------------------------------------------------ the cycle
def _run_dir_arg(run):
    path = Path(run)
    if not (path / "state.json").exists():
        raise HQClipError(f"{path} is not a run directory (no state.json): run `hqclip run CONFIG` first")
    return path


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config_path", metavar="CONFIG")
@click.argument("overrides", nargs=-1)
@click.option("--from", "redo_from", metavar="GEN:STAGE", help="Redo from this stage on (e.g. 1:annotate).")
@click.option("--stop-after", metavar="GEN:STAGE", help="Stop once this stage is done.")
@click.option("--dry-run", is_flag=True, help="Print the plan, memory per stage and disk per generation; run nothing.")
@click.option(
    "--gpu-memory-gb",
    type=float,
    default=None,
    help="With --dry-run: refuse stages over this GPU memory (default: the gpu_memory_gb config key).",
)
def run(config_path, overrides, redo_from, stop_after, dry_run, gpu_memory_gb):
    """Run generation 0 and the configured generations; the same command again resumes.

    CONFIG is a path or a shipped config's name; OVERRIDES are key=value pairs, e.g.
    `cycle.generations=3 train.epochs=5 name=myrun`. This is the run's one controller: start it once,
    not as several ranks of torchrun / srun / the `deepspeed` launcher (refused); a single-rank launcher's
    appended `--local_rank=N` is accepted and ignored.
    """
    from rich.markup import escape

    from .clip.dist import refuse_controller_under_launcher
    from .controller import run_cycle
    from .status import print_status, wide_console

    refuse_controller_under_launcher()  # before the config: its world-size check would name the wrong fix
    cfg = config_from(config_path, overrides)
    if dry_run:
        from .plan import check_fits, format_plan, make_plan

        plan = make_plan(cfg, gpu_memory_gb)
        for line in format_plan(cfg, plan):
            click.echo(line)
        check_fits(plan)
        return
    if gpu_memory_gb is not None:
        raise HQClipError("--gpu-memory-gb goes with --dry-run (or set the gpu_memory_gb config key)")
    check_writable_dir(cfg.run_dir, "run folder")  # before any stage: not a traceback from deep inside one
    console = wide_console()
    run_cycle(cfg, redo_from=redo_from, stop_after=stop_after)
    print_status(cfg.run_dir, console)
    console.print(f"run directory: {escape(str(cfg.run_dir))}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def status(run_dir):
    """A table of generations x stages: state, duration, rows, key metrics."""
    from .status import print_status

    print_status(_run_dir_arg(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--repair", is_flag=True, help="Rebuild a lost or corrupt state.json from the tables and folders.")
def doctor(run_dir, repair):
    """Check a run's record (state.json) against its tables and folders; --repair rebuilds a lost one."""
    from pathlib import Path

    from .doctor import check, rebuild, record_is_lost

    findings, healthy = check(run_dir)
    for line in findings:
        click.echo(line)
    if healthy:
        click.echo(f"{run_dir}: the record matches the tables and folders")
    elif repair and record_is_lost(run_dir):
        state, resume = rebuild(run_dir)
        done = sum(len(stages) for stages in state.data["generations"].values())
        click.echo(
            f"rebuilt {state.path} with {done} finished stage(s)"
            + (f"; `hqclip run {Path(run_dir) / 'config.yaml'}` resumes at {resume}" if resume else "")
        )
    elif repair:
        click.echo("the record is readable: `hqclip run` redoes the stages named above")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gen", "gens", type=int, multiple=True, help="Generation(s) to show (default: all).")
@click.option("--id", "ids", multiple=True, help="Sample id(s).")
@click.option("--sample", type=int, default=0, help="Show K random samples.")
@click.option("--where", help="A SQL filter on samples, e.g. \"split = 'train'\".")
@click.option("--image-out", type=click.Path(file_okay=False), help="Write the images into this folder.")
def inspect(run_dir, gens, ids, sample, where, image_out):
    """Samples with their alt-text and the four formulas, side by side across generations."""
    from .config import load_config
    from .pipeline import store_of
    from .state import RunState
    from .status import print_samples, samples_across_generations

    run_dir = _run_dir_arg(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if not (ids or sample or where):
        sample = DEFAULT_INSPECT_SAMPLES
    rows = samples_across_generations(
        store_of(cfg), RunState(run_dir), ids=ids, sample=sample, where=where, gens=list(gens) or None
    )
    if not rows:
        raise HQClipError("no sample matches")
    print_samples(rows, image_out=Path(image_out) if image_out else None)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gallery", type=int, default=12, help="Images in the gallery.")
def report(run_dir, gallery):
    """Write RUN/report/index.html: metrics, plots, loss curves, annotation stats, a gallery."""
    from .config import load_config
    from .pipeline import store_of
    from .report import write_report

    run_dir = _run_dir_arg(run_dir)
    check_writable_dir(run_dir / "report" / "img", "report folder")
    page = write_report(run_dir, store_of(load_config(run_dir / "config.yaml")), gallery=gallery)
    click.echo(f"report: {page}")


@main.command()
@click.argument("overrides", nargs=-1)
@click.option(
    "--config",
    "config_path",
    default=DEFAULT_DEMO_CONFIG,
    show_default=True,
    help="A config path or a shipped config's name.",
)
def demo(overrides, config_path):
    """The demo: generation 0 plus two generations on the built-in emoji scenes, then status and report.

    OVERRIDES are key=value pairs, e.g. `cycle.generations=1`.
    """
    from .controller import run_cycle
    from .pipeline import store_of
    from .report import write_report
    from .status import print_status

    cfg = config_from(config_path, overrides)
    check_writable_dir(cfg.run_dir, "run folder")
    run_cycle(cfg)
    print_status(cfg.run_dir)
    click.echo(f"report: {write_report(cfg.run_dir, store_of(cfg))}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--gen", type=int, required=True, help="The generation to export.")
@click.option("--out", type=click.Path(file_okay=False), help="Default: RUN/export/gen-GGG.")
@click.option("--what", type=click.Choice(["clip", "lvlm", "data"]), multiple=True, help="Default: all three.")
@click.option(
    "--data-format",
    type=click.Choice(["json", "wds"]),
    default="json",
    help="VLM-150M JSON files or webdataset shards.",
)
def export(run_dir, gen, out, what, data_format):
    """Export a generation: the CLIP (open_clip + HF), the LVLM (merged HF dir), the dataset."""
    from .config import load_config
    from .export import export_generation
    from .pipeline import store_of
    from .state import gen_dir

    run_dir = _run_dir_arg(run_dir)
    out = Path(out) if out else gen_dir(run_dir / "export", gen)
    check_writable_dir(out, "export folder")
    done = export_generation(
        store_of(load_config(run_dir / "config.yaml")), run_dir, gen, out, tuple(what) or ALL_EXPORTS, data_format
    )
    for key, value in done.items():
        click.echo(f"{key}: {value}")


# ------------------------------------------------------------------------------------------ CLIP tools
@main.command("eval")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Evaluate on this run's held-out splits.")
@click.option(
    "--dataset",
    "datasets",
    multiple=True,
    type=click.Path(),
    help="An image folder (one subfolder per class) or a CSV/JSONL of image path + caption(s).",
)
@click.option(
    "--split", "splits", multiple=True, help="Split(s) of the run (default: eval.select_split + eval.splits)."
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the metrics as JSON here.")
@click.option("--batch-size", type=int, default=None, help="Default: eval.batch_size.")
@click.option(
    "--device", default=None, help="auto, cpu, cuda, cuda:1 ... Default: the run's device with --run, else auto."
)
def eval_cmd(checkpoint, run_dir, datasets, splits, out, batch_size, device):
    """Evaluate a CLIP checkpoint directory: zero-shot, retrieval, negatives; a table and JSON."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .config import EvalConfig
    from .evaluate import evaluate_clip

    store, version, cfg = None, None, EvalConfig()
    run_device = "auto"
    if run_dir:
        from .pipeline import store_of
        from .state import RunState

        run_dir = _run_dir_arg(run_dir)
        run_cfg = config_from(run_dir / "config.yaml", ())
        store, cfg, run_device = store_of(run_cfg), run_cfg.eval, run_cfg.device
        version = RunState(run_dir).outputs(0, "data").get("samples_version")
    elif splits:
        raise HQClipError("--split needs --run RUN_DIR (the splits live in a run's store)")
    if batch_size:
        cfg.batch_size = batch_size
    metrics = evaluate_clip(
        Path(checkpoint),
        store,
        list(splits) or None,
        cfg,
        samples_version=version,
        out_json=out,
        datasets=datasets,
        device=device or run_device,
    )
    table = Table(title=f"eval {escape(str(checkpoint))}")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        name, metric = key.split("/", 1)
        table.add_row(escape(name), escape(metric), f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if out:
        click.echo(f"metrics: {out}")


@main.command("export-clip")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "open_clip"]),
    default="hf",
    help="hf: transformers CLIPModel + CLIPProcessor; open_clip: a local-dir checkpoint.",
)
@click.option("--extras/--no-extras", default=False, help="open_clip format: keep the short-tag head and vocabulary.")
def export_clip_cmd(checkpoint, out, fmt, extras):
    """Export a CLIP checkpoint directory for transformers or open_clip (checked to give the same embeddings)."""
    from .clip.export import export_clip

    diffs = export_clip(checkpoint, out, fmt, include_extras=extras)
    if diffs:
        click.echo(
            "max abs difference to open_clip: "
            + ", ".join(f"{k} {diffs[k]:.1e}" for k in ("image", "text", "logit_scale"))
        )
    click.echo(f"{fmt}: {out}")


def _version_arg(value):
    """A table version on the command line: an int, a tag such as gen-001, or None (latest)."""
    return int(value) if value is not None and value.isdigit() else value


@main.command("train", context_settings={"ignore_unknown_options": True})
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False),
    help="Train on this run's store, with its config and the versions its stages recorded.",
)
@click.option(
    "--store",
    "store_uri",
    help="A LanceDB store (instead of --run): a path, or a URI such as s3://bucket/path (options: --config's store.*).",
)
@click.option("--config", "config_path", help="A config path or shipped name. Default: RUN/config.yaml.")
@click.option("--generation", type=int, default=0, show_default=True, help="0: alt-text only; g: gen-g annotations.")
@click.option("--samples-version", help="Version or tag (default: the run's data stage, else latest).")
@click.option("--annotations-version", help="Version or tag (default: the run's gen annotate stage, else latest).")
@click.option("--teacher-version", help="Also use the teacher annotations at this version or tag.")
@click.option("--init-clip", type=click.Path(exists=True, file_okay=False), help="Start from this CLIP checkpoint.")
@click.option(
    "--stc-head-from",
    type=click.Path(exists=True, file_okay=False),
    help="Start the STC head's rows of shared tags from this CLIP checkpoint's head (default: --init-clip's).",
)
@click.option("--progress/--no-progress", default=True)
def train_cmd(
    out,
    overrides,
    run_dir,
    store_uri,
    config_path,
    generation,
    samples_version,
    annotations_version,
    teacher_version,
    init_clip,
    stc_head_from,
    progress,
):
    """Train a CLIP with the HQ-CLIP loss into OUT (OUT/model); the same command again resumes.

    OVERRIDES are key=value pairs, e.g. `train.epochs=5 train.world_size=2 loss.hni_mode=pair`.
    """
    from .clip.train import train_clip
    from .config import trained_generation
    from .store import storage_options_for

    if bool(run_dir) == bool(store_uri):
        raise HQClipError("give exactly one of --run RUN_DIR or --store URI")
    if run_dir:
        from .pipeline import store_of
        from .state import RunState

        run_dir = _run_dir_arg(run_dir)
        cfg = config_from(config_path or run_dir / "config.yaml", overrides)
        store = store_of(cfg)
        store_uri, storage_options = store.uri, store.storage_options
        state = RunState(run_dir)
        samples_version = samples_version or state.outputs(0, "data").get("samples_version")
        if generation:
            annotations_version = annotations_version or state.outputs(generation, "annotate").get(
                "annotations_version"
            )
    else:
        named = any(o.startswith("name=") for o in overrides)
        cfg = config_from(config_path, (() if named else (f"name={Path(out).name or 'train'}",)) + tuple(overrides))
        storage_options = storage_options_for(cfg.store, store_uri)  # an object store: the config's options
    model_dir = train_clip(
        trained_generation(cfg, generation or 0),
        store_uri,
        out,
        _version_arg(samples_version),
        annotations_version=_version_arg(annotations_version) if generation else None,
        generation=generation or None,
        init_clip=init_clip,
        progress=progress,
        teacher_version=_version_arg(teacher_version),
        stc_head_from=stc_head_from,
        storage_options=storage_options,
    )
    click.echo(f"clip: {model_dir}")
    click.echo(f"log: {Path(out) / 'log.jsonl'}")


# ------------------------------------------------------------------------------------------ data
from .data.cli import data  # noqa: E402  (the group's commands import their stages lazily)

main.add_command(data)

# ------------------------------------------------------------------------------------------ annotation
from .annotate.cli import annotate  # noqa: E402  (the group's commands import their stages lazily)

main.add_command(annotate)

# ------------------------------------------------------------------------------------------ LVLM
from .lvlm.cli import lvlm  # noqa: E402  (the group's commands import their stages lazily)

main.add_command(lvlm)


if __name__ == "__main__":
    sys.exit(main())
