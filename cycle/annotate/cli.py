"""`hqclip annotate ...`: run one annotation pass, import teacher seeds, or ask a teacher endpoint.

Registered on the root command in `cycle/cli.py`. Thin: settings, store, one call, a printed summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import HQClipError


def _settings(run_dir: str, config_path, overrides):
    """(run config, store, samples version): --config, else RUN/config.yaml, else defaults named after RUN."""
    from ..cli_common import pinned_data, run_config
    from ..store import Store

    cfg = run_config(run_dir, config_path, overrides)
    store = Store.from_config(cfg, run_dir)
    version = pinned_data(run_dir).get("samples_version")
    if version is None:
        if not store.has("samples") or store.count("samples") == 0:
            raise HQClipError(f"no samples in {store.uri}: build or ingest data first (hqclip data ...)")
        version = store.version("samples")
    return cfg, store, version


_run_option = click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory (store: RUN/lance unless store.uri is set).",
)
_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="Default: RUN/config.yaml if any."
)
_overrides_argument = click.argument("overrides", nargs=-1)  # key=value, like every other command


def _split_model_dir(model_dir, overrides):
    """MODEL_DIR is optional (openai, vllm server): a first positional `key=value` that is not a path is an
    override, not a model directory."""
    if model_dir and "=" in model_dir and not Path(model_dir).exists():
        return None, (model_dir, *overrides)
    return model_dir, overrides


@click.group()
def annotate():
    """Annotate samples into the four formulas; import or teach the seed set."""


@annotate.command("run")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False))
@_overrides_argument
@_run_option
@click.option("--gen", "generation", type=int, required=True, help="The generation the rows belong to.")
@click.option("--split", "splits", multiple=True, default=["train"], show_default=True)
@click.option("--score-clip", type=click.Path(file_okay=False), help="CLIP checkpoint dir to score desc vs neg_desc.")
@click.option("--out", type=click.Path(file_okay=False), help="Default: RUN/gen-GGG/annotate.")
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--lora",
    "lora_dir",
    type=click.Path(file_okay=False, exists=True),
    help="A LoRA adapter over MODEL_DIR (SFT's adapter-only output): merged in memory, or served by vLLM.",
)
@_config_option
@click.option("--progress/--no-progress", default=True)
def annotate_run(
    model_dir, overrides, run_dir, generation, splits, score_clip, out, device, lora_dir, config_path, progress
):
    """Annotate every sample of SPLIT with MODEL_DIR (an HF LLaVA dir, merged or with --lora; none for
    openai/vllm server).

    OVERRIDES are key=value pairs, e.g. `annotate.batch_size=32 annotate.backend=vllm`.
    """
    from ..state import gen_dir
    from .run import annotate_generation

    model_dir, overrides = _split_model_dir(model_dir, overrides)
    cfg, store, version = _settings(run_dir, config_path, overrides)
    out = Path(out) if out else gen_dir(run_dir, generation) / "annotate"
    stats = annotate_generation(
        cfg.annotate,
        model_dir,
        store,
        version,
        generation,
        out,
        score_clip=score_clip,
        progress=progress,
        splits=splits,
        device=device,
        lora_dir=lora_dir,
        cluster=cfg.cluster,  # cluster.executor=ray runs it on Ray
    )
    keys = ("rows", "by_status", "parse_rate", "sentences_per_image", "tags_per_image", "score_mean", "this_run")
    for key in keys:
        click.echo(f"{key}: {json.dumps(stats.get(key))}")
    if "quality" in stats:
        click.echo(f"quality: {json.dumps(stats['quality'])}")
    click.echo(f"stats: {out / 'stats.json'}")


@annotate.command("import-seed")
@click.argument("path", type=click.Path())
@_overrides_argument
@_run_option
@click.option("--origin", help="Recorded with every row (default: import:<name>).")
@_config_option
@click.option("--progress/--no-progress", default=True)
def annotate_import_seed(path, overrides, run_dir, origin, config_path, progress):
    """Import teacher annotations (dir of <id>.json, .jsonl, or .json) in VLM-150M format into the `teacher` table.

    OVERRIDES are key=value pairs (e.g. `store.uri=...`).
    """
    from .teacher import import_seed

    _, store, version = _settings(run_dir, config_path, overrides)
    stats = import_seed(path, store, samples_version=version, origin=origin, progress=progress)
    click.echo(json.dumps(stats, indent=1))


@annotate.command("teach")
@_overrides_argument
@_run_option
@click.option("--ids", "ids_file", type=click.Path(dir_okay=False), help="A file with one sample id per line.")
@click.option("--count", type=int, help="Or: this many training samples, chosen with --seed.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Default: RUN/teacher (request log, stats).")
@_config_option
def annotate_teach(overrides, run_dir, ids_file, count, seed, out, config_path):
    """Ask the teacher endpoint (annotate.openai.*) to annotate seed samples into the `teacher` table.

    OVERRIDES are key=value pairs, e.g. `annotate.openai.model=gpt-4o annotate.openai.concurrency=8`.
    """
    from .teacher import choose_seed_ids, teach_seed

    if bool(ids_file) == bool(count):
        raise HQClipError("give exactly one of --ids FILE or --count N")
    cfg, store, version = _settings(run_dir, config_path, overrides)
    if ids_file:
        try:
            text = Path(ids_file).read_text()
        except OSError as err:
            raise HQClipError(f"cannot read the id file '{ids_file}': {err.strerror or err}") from None
        ids = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        ids = choose_seed_ids(store, version, count, seed)
    stats = teach_seed(cfg.annotate, store, version, ids, Path(out) if out else Path(run_dir) / "teacher")
    click.echo(json.dumps(stats, indent=1))
