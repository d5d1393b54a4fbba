"""Build the emoji-scenes dataset into a run's store: plan (text), render (pixels), write (LanceDB).

Idempotent and resumable: rows whose id is already in `samples` are neither rendered nor written again,
and writes go in batches of `write_batch` rows through `Store.insert_new`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tqdm.auto import tqdm

from cycle.config import ConfigError, EmojiScenesConfig, StoreConfig

from .plan import Plan, PlannedRow, plan_emoji_scenes
from .render import GlyphCache, png_bytes, render_scene

if TYPE_CHECKING:
    from cycle.store import Store

SOURCE = "emoji-scenes"
SEED_ORIGIN = "emoji-scenes:scene-graph"


def _meta_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sample_row(row: PlannedRow, glyphs: GlyphCache, image_size: int) -> dict:
    """One `samples` row: the rendered PNG and the planned text."""
    image = png_bytes(render_scene(row.scene, glyphs, image_size))
    return {
        "id": row.id,
        "image": image,
        "alt_text": row.alt_text,
        "source": SOURCE,
        "split": row.split,
        "width": image_size,
        "height": image_size,
        "sha256": hashlib.sha256(image).hexdigest(),
        "meta": _meta_json(row.meta),
    }


def _check_same_build(plan: Plan, store: "Store") -> set[str]:
    """Ids of this dataset already in the store; refuses a store built from another config, whose rows
    would otherwise be silently mixed with this one's under the same ids."""
    built = store.read("samples", ["id", "meta"], where=f"source = '{SOURCE}'")
    planned = {row.id: row.meta for row in plan.rows}
    ids, metas = built.column("id").to_pylist(), built.column("meta").to_pylist()
    differ = [i for i, m in zip(ids, metas) if i not in planned or m != _meta_json(planned[i])]
    if differ:
        raise ConfigError(
            f"config key 'data.emoji': the store at {store.uri} already holds emoji-scenes built "
            f"from another config or an older builder ({len(differ)} of {len(ids)} rows differ, e.g. {differ[0]}): "
            "build into a fresh directory, or use the config it was built with"
        )
    return set(ids)


def build_emoji_scenes(
    cfg: EmojiScenesConfig, store: "Store", progress: bool = True, write_batch: int = StoreConfig.write_batch
) -> dict[str, int]:
    """Build (or finish building) the dataset of `cfg` into `store`; returns the row count per split.

    `write_batch` is the run's `store.write_batch`: rows per commit. It changes how many versions the
    build makes, never the rows (each is a pure function of `cfg`).

    Raises `ConfigError` for impossible settings or a store built from another config, and
    `EmojiFontError` when the font is missing, all before anything is written.
    """
    plan: Plan = plan_emoji_scenes(cfg)
    present = _check_same_build(plan, store)
    todo = [row for row in plan.rows if row.id not in present]
    if todo:
        glyphs = GlyphCache(cfg.font)
        for obj in plan.vocab:  # every glyph drawn (and checked) before the first write
            glyphs.base(obj.emoji)
        with tqdm(total=len(todo), desc="emoji-scenes: render", unit="img", disable=not progress) as bar:
            for start in range(0, len(todo), write_batch):
                batch = [sample_row(row, glyphs, cfg.image_size) for row in todo[start : start + write_batch]]
                store.insert_new("samples", batch)
                bar.update(len(batch))
    seeded = store.ids("teacher")
    new_seeds = [{**s, "origin": SEED_ORIGIN} for s in plan.seeds if s["id"] not in seeded]
    if new_seeds:
        store.insert_new("teacher", new_seeds)
    return plan.counts()


def lance_dir(out: Path) -> Path:
    """A run directory's database (`RUN/lance`); a folder that already is a LanceDB database is used as is."""
    if any(out.glob("*.lance")) and not (out / "lance").exists():
        return out
    return out / "lance"


def build_command(
    out: str | Path,
    cfg: EmojiScenesConfig,
    write_batch: int = StoreConfig.write_batch,
    store_cfg: Optional[StoreConfig] = None,
) -> dict[str, int]:
    """`hqclip data build emoji-scenes`: build into OUT's database (or `store_cfg.uri` when that is set)
    and print a table of rows per split."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from cycle.store import Store

    if store_cfg is not None and store_cfg.uri:
        store = Store.from_config(store_cfg, out)
    else:
        store = Store(lance_dir(Path(out)))
    uri = store.uri
    start = time.perf_counter()
    counts = build_emoji_scenes(cfg, store, write_batch=write_batch)
    table = Table(title=f"emoji-scenes in {escape(str(uri))} ({time.perf_counter() - start:.1f} s)")
    table.add_column("split")
    table.add_column("rows", justify="right")
    for split, n in counts.items():
        table.add_row(split, str(n))
    table.add_row("seed (teacher annotations)", str(store.count("teacher")), style="dim")
    table.add_row("vocabulary objects", str(cfg.vocab_size), style="dim")
    Console().print(table)
    return counts
