"""Looking at a run: the status table (generations x stages) and samples side by side across generations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .data.images import image_ext
from .files import check_writable_dir, safe_name
from .pipeline import ALL_STAGES
from .state import RunState
from .store import Store, sql_in

# The few metrics worth a column; the report shows all of them.
KEY_METRICS = {
    "zero-shot top1": "test_zeroshot/top1",
    "retrieval R@1": "test_retrieval/retrieval_mean_r1",
    "neg. acc": "test_negatives/acc",
    "reworded R@1": "test_retrieval_reworded/retrieval_mean_r1",  # the same test in wordings not taught
    "reworded neg.": "test_negatives_reworded/acc",
    "compos. R@1": "test_compositional/retrieval_mean_r1",
    "val R@1": "val/retrieval_mean_r1",
}
PIPED_CONSOLE_WIDTH = 200  # columns when stdout is not a terminal, so tables are not squeezed into 80
MINUTES_FROM_S = 90  # durations from this many seconds on read in minutes


def status_table(run_dir: str | Path) -> Table:
    state = RunState(run_dir)
    table = Table(title=Text(f"run {Path(run_dir).name}"), show_lines=False)
    table.add_column("gen", justify="right")
    for stage in ALL_STAGES:
        table.add_column(stage)
    for label in KEY_METRICS:
        table.add_column(label, justify="right")
    for gen in state.generations:
        cells = [str(gen)]
        for stage in ALL_STAGES:
            entry = state.stage(gen, stage)
            cells.append(_stage_cell(stage, entry))
        metrics = state.stage(gen, "eval").get("metrics", {})
        for key in KEY_METRICS.values():
            value = metrics.get(key)
            cells.append("" if value is None else f"{value:.3f}")
        table.add_row(*cells)
    return table


def _stage_cell(stage: str, entry: dict) -> str:
    status = entry.get("status")
    if not status:
        return ""
    if status != "done":
        return f"[yellow]{escape(status)}[/]"
    text = f"[green]done[/] {_duration(entry.get('duration_s', 0))}"
    m = entry.get("metrics", {})
    rows = m.get("rows") or m.get("counts/total") or m.get("total")
    if rows:
        text += f" {int(rows)}r"
    return text


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < MINUTES_FROM_S else f"{seconds / 60:.1f}m"


def wide_console() -> Console:
    """A terminal's own width; `PIPED_CONSOLE_WIDTH` columns when piped."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=PIPED_CONSOLE_WIDTH)


def print_status(run_dir: str | Path, console: Optional[Console] = None) -> None:
    (console or wide_console()).print(status_table(run_dir))


def samples_across_generations(
    store: Store,
    state: RunState,
    ids: Optional[Iterable[str]] = None,
    sample: int = 0,
    where: Optional[str] = None,
    gens: Optional[list[int]] = None,
    seed: int = 0,
) -> list[dict]:
    """Rows of `samples` with alt-text, the seed annotation and each generation's four formulas."""
    data = state.outputs(0, "data")
    version = data.get("samples_version")
    filters = []
    if ids:
        filters.append(sql_in("id", ids))
    if where:
        filters.append(f"({where})")
    if where:
        store.check_filter("samples", where, version)  # a typo in --where: one line naming it
    where_all = " AND ".join(filters) or None
    columns = ["id", "alt_text", "split", "image", "meta"]
    if sample:  # the rows `random.sample` picks from the whole selection, reading the selection's ids only
        import random

        n = store.count("samples", where_all, version)
        picked = store.ids_at("samples", random.Random(seed).sample(range(n), min(sample, n)), where_all, version)
        by_id = store.rows_by_id("samples", picked, columns, version=version)
        rows = [by_id[i] for i in picked]
    else:
        rows = store.read("samples", columns, where_all, version=version).to_pylist()
    wanted = [r["id"] for r in rows]
    teacher_rows = _by_id(store, "teacher", wanted, data.get("teacher_version"))
    for gen in gens if gens is not None else [g for g in state.generations if g > 0]:
        ann = state.outputs(gen, "annotate").get("annotations_version")
        if ann is None:
            continue
        by_id = _by_id(store, "annotations", wanted, ann, f"generation = {gen}")
        for r in rows:
            r[f"gen-{gen}"] = by_id.get(r["id"])  # a display label ("gen-1"), not the gen-001 folder or tag
    for r in rows:
        r["teacher"] = teacher_rows.get(r["id"])
        r["meta"] = json.loads(r["meta"]) if r.get("meta") else None
    return rows


def _by_id(store: Store, name: str, ids: list[str], version, extra: Optional[str] = None) -> dict:
    if not ids or version is None or not store.has(name):
        return {}
    return store.rows_by_id(name, ids, where=extra, version=version)


def data_text(value) -> Text:
    """Data (ids, alt-text, model output) for a rich table: a `Text`, which rich never parses, so
    "[/b]" or "[red]" prints as is and ":smile:" stays words (escape() alone leaves emoji codes live)."""
    return Text("" if value is None else str(value))


def print_samples(rows: list[dict], console: Optional[Console] = None, image_out: Optional[Path] = None) -> None:
    console = console or wide_console()
    if image_out:
        check_writable_dir(image_out, "image folder")
    for r in rows:
        table = Table(title=data_text(f"{r['id']}  [{r['split']}]"), show_header=True, expand=True)
        table.add_column("source", style="bold")
        for key in ("desc", "neg_desc", "tags", "neg_tags"):
            table.add_column(key)
        table.add_row("alt-text", data_text(r["alt_text"]), "", "", "")
        for label in ["teacher"] + sorted(k for k in r if k.startswith("gen-")):
            rec = r.get(label)
            if rec:
                status = f" ({rec['status']})" if rec.get("status") and rec["status"] != "ok" else ""
                table.add_row(
                    data_text(label + status),
                    *[
                        data_text("\n".join(map(str, rec.get(k) or [])))
                        for k in ("desc", "neg_desc", "tags", "neg_tags")
                    ],
                )
        meta = r.get("meta")
        if isinstance(meta, dict) and meta.get("clean"):
            table.add_row("truth", data_text(meta["clean"]), "", "", "")
        console.print(table)
        if image_out:
            image_out.mkdir(parents=True, exist_ok=True)
            path = image_out / safe_name(r["id"], image_ext(r["image"]))
            path.write_bytes(r["image"])
            console.print(Text(f"image: {path}", style="dim"))
