"""`hqclip data`: build the built-in dataset, ingest your own data, list what a run holds."""

from __future__ import annotations

from pathlib import Path

import click

from ..cli_common import config_from, run_config
from ..errors import HQClipError


@click.group()
def data():
    """Build the built-in dataset, ingest your own, list what a run holds."""


def _data_settings(run_dir, config_path, overrides):
    """(data config, store config) from --config, else RUN/config.yaml, else the defaults."""
    from ..config import DataConfig, StoreConfig

    path = Path(config_path) if config_path else Path(run_dir) / "config.yaml"
    if config_path or path.is_file() or overrides:
        cfg = run_config(run_dir, config_path, overrides)
        return cfg.data, cfg.store
    return DataConfig(), StoreConfig()


@data.command("ingest")
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option(
    "--run",
    "run_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory (store: RUN/lance unless store.uri is set).",
)
@click.option("--kind", type=click.Choice(["auto", "folder", "wds", "parquet"]), default="auto", show_default=True)
@click.option("--split", default="train", show_default=True)
@click.option("--id-prefix", default="", help="Prepended to every id (keeps several sources apart).")
@click.option("--image-column", help="Parquet: the image bytes or path column (default: detected).")
@click.option("--text-column", help="Parquet: the alt-text column (default: detected).")
@click.option("--id-column", help="Parquet: the id column (default: id, uid or key if present).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Default: RUN/config.yaml if any.")
@click.option("--progress/--no-progress", default=True)
def data_ingest(
    source, run_dir, kind, split, id_prefix, image_column, text_column, id_column, config_path, overrides, progress
):
    """Ingest SOURCE (image folder, webdataset shards, parquet) into the run's samples table.

    OVERRIDES are key=value pairs, e.g. `data.max_pixels=20000000 store.write_batch=4096`.
    """
    from rich.console import Console

    from ..store import Store
    from .ingest import ingest, report_table

    data_cfg, store_cfg = _data_settings(run_dir, config_path, overrides)
    store = Store.from_config(store_cfg, run_dir)
    report = ingest(
        source,
        store,
        kind,
        split,
        data_cfg,
        progress,
        write_batch=store_cfg.write_batch,
        id_prefix=id_prefix,
        image_column=image_column,
        text_column=text_column,
        id_column=id_column,
    )
    Console().print(report_table(report))


@data.command("list")
@click.argument("run_dir", type=click.Path(file_okay=False))
def data_list(run_dir):
    """Rows per table and split, versions, tags, and rejects by reason."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from ..store import SCHEMAS, Store, is_local, store_uri

    store_cfg = _data_settings(run_dir, None, ())[1]  # RUN/config.yaml's store (store.uri), else RUN/lance
    uri = store_uri(store_cfg, run_dir)
    if is_local(uri) and not Path(uri).is_dir():
        raise HQClipError(f"no store at {uri}")
    store, console = Store.from_config(store_cfg, run_dir), Console()
    tables = Table(title=f"tables of {escape(uri)}")
    for column in ("table", "rows", "by", "version", "versions kept", "tags"):
        tables.add_column(column, justify="right" if column in ("rows", "version", "versions kept") else "left")
    by_column = {"samples": "split", "annotations": "generation", "rejects": "reason"}
    for name in SCHEMAS:
        if not store.has(name):
            continue
        parts = store.count_by(name, by_column[name]) if name in by_column else {}
        tags = ", ".join(f"{t}=v{v}" for t, v in sorted(store.tags(name).items()))
        tables.add_row(
            name,
            str(store.count(name)),
            escape(", ".join(f"{k}: {v}" for k, v in parts.items())),
            str(store.version(name)),
            str(len(store.versions(name))),
            escape(tags),
        )
    console.print(tables)
    if store.has("rejects") and store.count("rejects"):
        rejects = Table(title="rejects by source and reason")
        for column in ("source", "reason", "rows"):
            rejects.add_column(column, justify="right" if column == "rows" else "left")
        counts = store.count_by("rejects", ["source", "reason"])
        for (source, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
            rejects.add_row(Text(source), Text(reason), str(n))  # data, as is
        console.print(rejects)


@data.command("build", context_settings={"ignore_unknown_options": True})
@click.argument("dataset", type=click.Choice(["emoji-scenes"]))
@click.argument("overrides", nargs=-1)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="A run directory (the data goes to OUT/lance) or an existing LanceDB directory.",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="A run config (uses data.emoji).")
def data_build(dataset, overrides, out, config_path):
    """Build the built-in dataset into a store; the same command again finishes or confirms it.

    OVERRIDES are key=value pairs, e.g. `data.emoji.n_train=500 data.emoji.image_size=32`.
    """
    from .emoji.build import build_command

    named = any(o.startswith("name=") for o in overrides)  # a run name is required but unused here
    cfg = config_from(config_path, (() if named else (f"name={Path(out).name or 'data'}",)) + tuple(overrides))
    # with store.uri set (an object store), the data goes where the run will read it
    build_command(out, cfg.data.emoji, write_batch=cfg.store.write_batch, store_cfg=cfg.store)
