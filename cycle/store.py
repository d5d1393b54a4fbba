"""The run's LanceDB database: `samples`, `seed`, `annotations`, `rejects`.

- `samples` is written once (ingest or the built-in dataset) and never rewritten by a generation.
- `annotations` is append-only, keyed by (`id`, `generation`); writes are insert-if-absent, so a resumed
  annotation pass neither duplicates nor loses rows.
- A tag per finished generation (`gen-002`) pins exactly what CLIP_g trained on; readers take a pinned
  version, never "latest". Compaction and cleanup run from the controller (`Store.compact`), not writers.
- The database is a local path or an object store (`s3://bucket/path`, `gs://`, `az://`) reached with
  Lance storage options (`StorageOptions`); `Store.from_config` is the one way to open a run's store.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import lancedb
import pyarrow as pa

from .errors import HQClipError

# Ids per `IN (...)` lookup when checking which keys of a batch are already stored: bounded filter size.
PRESENT_LOOKUP_CHUNK = 1000
# Tables at least this large get a BTREE index on their key column (`Store.index_keys`), so the `IN (...)`
# lookups (ingest's duplicate check, `present`, `rows_by_id`) read the index, not every key. Below it a scan
# of the key column is as fast (~12 ms per 1,000 ids at 400,000 rows, with or without an index).
KEY_INDEX_MIN_ROWS = 1_000_000
# Rows per record batch of a streaming scan: what a whole-table read holds at once instead of the table.
SCAN_BATCH_ROWS = 1024
# Rows per batch of a scan of a few small columns (ids, splits, scores): a few MB, and few batches to loop over.
COLUMN_SCAN_ROWS = 65_536

_text_list = pa.list_(pa.string())

SAMPLES = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),  # encoded bytes as ingested (PNG / JPEG / WebP)
        ("alt_text", pa.string()),
        ("source", pa.string()),  # where the row came from: "emoji-scenes", a folder, a shard, a parquet file
        ("split", pa.string()),  # "train", "val", "test_*" (held-out: never trained on)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),  # of the image bytes
        ("meta", pa.string()),  # JSON; the exact scene graph for the built-in data, else null
    ]
)

FORMULAS = [("desc", _text_list), ("neg_desc", _text_list), ("tags", _text_list), ("neg_tags", _text_list)]

TEACHER = pa.schema([("id", pa.string()), *FORMULAS, ("origin", pa.string())])

ANNOTATIONS = pa.schema(
    [
        ("id", pa.string()),
        ("generation", pa.int32()),
        *FORMULAS,
        ("raw_output", pa.string()),
        ("status", pa.string()),  # "ok", "repaired", "failed"
        ("reason", pa.string()),  # what was repaired, or why it failed
        ("attempts", pa.int32()),
        ("annotator", pa.string()),  # model + adapter fingerprint
        ("prompt_hash", pa.string()),
        ("score", pa.float32()),  # CLIP_{g-1} margin of desc over neg_desc (null until scored)
    ]
)

REJECTS = pa.schema(
    [
        ("source", pa.string()),
        ("key", pa.string()),  # file name, shard member or row number
        ("reason", pa.string()),  # short class: "corrupt_image", "empty_text", "non_utf8_text", ...
        ("detail", pa.string()),
    ]
)

SCHEMAS = {"samples": SAMPLES, "teacher": TEACHER, "annotations": ANNOTATIONS, "rejects": REJECTS}
# The first key column is the one looked up (`_drop_present`). Rejects are keyed too, so ingesting a
# source again does not store its rejects again (the same source, key and reason once).
KEYS = {
    "samples": ["id"],
    "teacher": ["id"],
    "annotations": ["id", "generation"],
    "rejects": ["key", "source", "reason"],
}


# The one definition of an annotation that training, alignment, SFT, quality and export may use: parsed
# (possibly repaired). A NULL status is not usable: every writer sets one (imports write "ok").
USABLE_STATUSES = ("ok", "repaired")
USABLE = "status IN ('ok', 'repaired')"


def is_usable(status: Optional[str]) -> bool:
    return status in USABLE_STATUSES


def sql_in(column: str, values: Iterable[str]) -> str:
    """`column IN ('a', 'b')` with each value quoted as an SQL string literal (ids are data, not SQL)."""
    quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})" if quoted else "FALSE"


def gen_tag(generation: int) -> str:
    return f"gen-{generation:03d}"


class StoreError(HQClipError, ValueError):
    """The store refuses a write that would lose what a version or tag means (a ValueError for older callers)."""


class BadFilter(HQClipError, ValueError):
    """A user's SQL filter (`hqclip inspect --where`) that Lance cannot parse or plan."""


def is_local(uri: str | Path) -> bool:
    """A filesystem path; a URI with a scheme (`s3://`, `gs://`, `az://`, `file://`) is left to Lance."""
    return "://" not in str(uri)


def _option_value(value: Any) -> str:
    # Lance takes strings only; YAML's `allow_http: true` arrives as a bool
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class StorageOptions(dict):
    """Lance storage options: `plain` ones as given, plus `env` ones (option -> environment variable) read
    from the environment now. A plain dict to Lance and LanceDB.

    Pickled (to DataLoader workers, to spawned training ranks through a file), it carries the variables'
    names, not their values, and reads them again where it is unpickled: those processes inherit the
    environment, and a secret never lands in a pickle on disk.
    """

    def __init__(self, plain: Optional[Mapping[str, Any]] = None, env: Optional[Mapping[str, str]] = None):
        self.plain = {str(k): _option_value(v) for k, v in (plain or {}).items()}
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        resolved = dict(self.plain)
        for key, var in self.env.items():
            value = os.environ.get(var)
            if not value:
                raise StoreError(f"config key 'store.storage_options_env.{key}': environment variable {var} is not set")
            resolved[key] = value
        super().__init__(resolved)

    def __reduce__(self):
        return (StorageOptions, (self.plain, self.env))

    def __repr__(self) -> str:  # never print a secret (logs, tracebacks)
        return f"StorageOptions(plain={self.plain!r}, env={self.env!r})"


def store_uri(store_cfg, run_dir: str | Path) -> str:
    """The run's database: `store.uri`, else `<run_dir>/lance`."""
    return str(store_cfg.uri or Path(run_dir) / "lance")


def storage_options_for(store_cfg, uri: str | Path) -> Optional[StorageOptions]:
    """The config's storage options for `uri`; None for a local path (it needs no environment variable)."""
    return None if is_local(uri) else StorageOptions(store_cfg.storage_options, store_cfg.storage_options_env)


class Store:
    """One LanceDB database per run. Thin on purpose: tables, keyed writes, versions, tags.

    `uri` is a local path (created if missing) or an object store URI; `storage_options` (a dict or
    `StorageOptions`) go to every LanceDB connection and Lance dataset opened on it.
    """

    def __init__(self, uri: str | Path, storage_options: Optional[Mapping[str, str]] = None):
        self.uri = str(uri)
        self.storage_options = storage_options if storage_options is not None else {}
        if is_local(self.uri):  # only a path is a directory to make ("s3://b/x" would make a folder "s3:")
            Path(self.uri).mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(self.uri, storage_options=dict(self.storage_options) or None)

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path | None = None) -> "Store":
        """The one way to open a run's store from its config: `store.uri` with `store.storage_options` and
        `store.storage_options_env`, else `<run_dir>/lance` (`run_dir` defaults to the config's run folder).
        `cfg` is a `RunConfig`, or its `store` section when `run_dir` is given."""
        store_cfg = getattr(cfg, "store", cfg)
        uri = store_uri(store_cfg, run_dir if run_dir is not None else cfg.run_dir)
        return cls(uri, storage_options_for(store_cfg, uri))

    # -- tables --------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.names()

    def names(self) -> list[str]:
        """The tables in the store."""
        names = self.db.list_tables()
        return list(getattr(names, "tables", names))

    def table(self, name: str, version: int | str | None = None):
        """Open a table, creating it empty with its schema on first use; `version` pins an int or a tag."""
        if not self.has(name):
            if name == "teacher" and self.has("seed"):
                raise StoreError(
                    f"{self.uri} keeps its teacher annotations in a table named 'seed' (written by "
                    f"hqclip before 0.2): start a new run, or rename {self.uri}/seed.lance to teacher.lance"
                )
            self.db.create_table(name, schema=SCHEMAS[name], exist_ok=True)
        tbl = self.db.open_table(name)
        if version is not None:
            tbl.checkout(version)
        return tbl

    def version(self, name: str) -> int:
        """The table's current version (what a stage pins and its fingerprint records)."""
        return self.table(name).version

    def count(self, name: str, where: str | None = None, version: int | str | None = None) -> int:
        return self.table(name, version).count_rows(where)

    def count_by(
        self,
        name: str,
        column: str | list[str],
        version: int | str | None = None,
        where: str | None = None,
        batch_size: int = COLUMN_SCAN_ROWS,
    ) -> dict:
        """Rows per value of a column (split, generation, status, reason), or per tuple of values of several
        columns, in a streaming scan of those columns only (one batch's values in memory, not the column)."""
        columns = [column] if isinstance(column, str) else list(column)
        counts: dict = {}
        for rb in self.scan(name, columns, where, version, batch_size):
            part = pa.Table.from_batches([rb]).group_by(columns).aggregate([([], "count_all")])
            keys = [part.column(c).to_pylist() for c in columns]
            for key, n in zip(zip(*keys) if len(columns) > 1 else keys[0], part.column("count_all").to_pylist()):
                counts[key] = counts.get(key, 0) + n
        return dict(sorted(counts.items(), key=lambda kv: _none_last(kv[0])))

    # -- writes --------------------------------------------------------------------------------------
    def append(self, name: str, rows: pa.Table | list[dict]) -> int:
        """Plain append (rejects, and first writes of `samples`). Returns the new version."""
        data = _as_table(name, rows)
        if data.num_rows == 0:
            return self.table(name).version
        tbl = self.table(name)
        tbl.add(data)
        return tbl.version

    def insert_new(self, name: str, rows: pa.Table | list[dict]) -> int:
        """Insert rows whose key is absent; rows already present are left as they are (idempotent).

        Returns the number of rows that were new. Skips the commit entirely when nothing is new, since a
        merge that changes nothing still makes a version.
        """
        data = dedupe(_as_table(name, rows), KEYS[name])
        if data.num_rows == 0:
            return 0
        tbl = self.table(name)
        before = tbl.count_rows()
        if before == 0:
            tbl.add(data)
            return data.num_rows
        data = _drop_present(tbl, data, KEYS[name])
        if data.num_rows == 0:
            return 0
        (tbl.merge_insert(KEYS[name]).when_not_matched_insert_all().execute(data))
        return tbl.count_rows() - before

    def delete(self, name: str, where: str, drop_tag: str | None = None) -> int:
        """Delete rows (the controller's redo of a stage; writers never delete). Returns rows removed."""
        tbl = self.table(name)
        before = tbl.count_rows()
        if drop_tag and drop_tag in self.tags(name):
            tbl.tags.delete(drop_tag)
        tbl.delete(where)
        return before - tbl.count_rows()

    # -- reads ---------------------------------------------------------------------------------------
    def read(
        self, name: str, columns: list[str] | None = None, where: str | None = None, version: int | str | None = None
    ) -> pa.Table:
        return self.table(name, version).to_lance().to_table(columns=columns, filter=where)

    def scan(
        self,
        name: str,
        columns: list[str] | None = None,
        where: str | None = None,
        version: int | str | None = None,
        batch_size: int = SCAN_BATCH_ROWS,
    ) -> Iterator[pa.RecordBatch]:
        """The rows of `read(...)`, in the same order, as record batches of at most `batch_size` rows."""
        ds = self.table(name, version).to_lance()
        yield from ds.to_batches(columns=columns, filter=where, batch_size=batch_size)

    def rows_by_id(
        self,
        name: str,
        ids: Iterable[str],
        columns: list[str] | None = None,
        where: str | None = None,
        version: int | str | None = None,
        chunk: int = PRESENT_LOOKUP_CHUNK,
    ) -> dict[str, dict]:
        """The rows of `ids` (a bounded set of them) as dicts by id, fetched `chunk` ids per `IN (...)`
        filter (and `where`, when given), never the whole table. An id without a row is absent."""
        wanted = sorted(set(ids))
        out: dict[str, dict] = {}
        for start in range(0, len(wanted), chunk):
            keys = sql_in("id", wanted[start : start + chunk])
            rows = self.read(name, columns, f"{keys} AND ({where})" if where else keys, version=version)
            out.update((r["id"], r) for r in rows.to_pylist())
        return out

    def ids_at(
        self,
        name: str,
        positions: Iterable[int],
        where: str | None = None,
        version: int | str | None = None,
        batch_size: int = COLUMN_SCAN_ROWS,
    ) -> list[str]:
        """The ids at `positions` (0-based, in the given order) of the rows `read(name, where=where)` returns,
        found by a batched scan of the id column: a random sample of rows without reading every row."""
        positions = list(positions)
        wanted, found, offset = set(positions), {}, 0
        for rb in self.scan(name, ["id"], where, version, batch_size):
            if wanted:
                ids = rb.column("id")
                found.update((p, ids[p - offset].as_py()) for p in wanted if offset <= p < offset + rb.num_rows)
            offset += rb.num_rows
            if len(found) == len(wanted):
                break
        missing = [p for p in positions if p not in found]
        if missing:
            raise IndexError(f"{name}: position {missing[0]} is past the {offset} rows of the scan")
        return [found[p] for p in positions]

    def present(self, name: str, ids: Iterable[str], version: int | str | None = None) -> set[str]:
        """Which of `ids` (a bounded batch of them) are in table `name`'s key column: `IN (...)` lookups,
        never every key of the table in Python. A table not created yet holds none."""
        if not self.has(name):
            return set()
        ds = self.table(name, version).to_lance()
        return {key[0] for key in _present_keys(ds, KEYS[name][:1], ids)}

    def check_filter(self, name: str, where: str, version: int | str | None = None) -> None:
        """Raise `BadFilter` naming `where` unless Lance can parse and plan it on table `name` (reads no rows)."""
        try:
            self.table(name, version).to_lance().scanner(columns=[], filter=where, limit=0, with_row_id=True).to_table()
        except ValueError as err:  # Lance: "Invalid user input: ..., /path/to/file.rs:109:" over several lines
            reason = re.sub(r",\s*/\S+\.rs:\d+(:\d+)?:?\s*$", "", str(err).splitlines()[0] if str(err) else "")
            raise BadFilter(f"filter {where!r} on {name}: {reason or type(err).__name__}") from None

    def ids(self, name: str, where: str | None = None, version: int | str | None = None) -> set[str]:
        return set(self.read(name, ["id"], where, version).column("id").to_pylist())

    # -- versions and tags ---------------------------------------------------------------------------
    def versions(self, name: str) -> list[int]:
        return [v["version"] for v in self.table(name).list_versions()]

    def tags(self, name: str) -> dict[str, int]:
        return {k: v["version"] for k, v in self.table(name).tags.list().items()}

    def tag(self, name: str, tag: str, version: int | None = None) -> int:
        """Tag a version (default: current). Re-tagging the same version is a no-op; another is an error."""
        tbl = self.table(name)
        version = tbl.version if version is None else version
        existing = self.tags(name).get(tag)
        if existing == version:
            return version
        if existing is not None:
            raise StoreError(f"tag '{tag}' of table '{name}' already points at version {existing}, not {version}")
        tbl.tags.create(tag, version)
        return version

    def compact(self, older_than: timedelta = timedelta(0)) -> dict[str, int]:
        """Compact every table's files, bring its key index up to date (`index_keys`) and drop old untagged
        versions (tagged ones stay readable).

        Called by the controller between stages, never while a writer runs. Returns the new versions.
        """
        out = {}
        for name in self.names():
            ds = self.db.open_table(name).to_lance()
            ds.optimize.compact_files()
            if name in KEYS:
                self.index_keys(name)
            ds = self.db.open_table(name).to_lance()
            ds.cleanup_old_versions(older_than=older_than, error_if_tagged_old_versions=False)
            out[name] = self.db.open_table(name).version
        return out

    def index_keys(self, name: str, min_rows: Optional[int] = None) -> bool:
        """Index table `name`'s key column (BTREE) once it holds `min_rows` (default `KEY_INDEX_MIN_ROWS`),
        or add the rows written since to that index. True when an index commit was made. Only the table's
        one writer, or the controller between stages, calls it (it commits a version)."""
        if not self.has(name):
            return False
        ds = self.table(name).to_lance()
        if ds.count_rows() < (KEY_INDEX_MIN_ROWS if min_rows is None else min_rows):
            return False
        column = KEYS[name][0]
        index = next((i.name for i in ds.describe_indices() if list(i.field_names) == [column]), None)
        if index is None:
            ds.create_scalar_index(column, "BTREE")
        elif ds.stats.index_stats(index)["num_unindexed_rows"]:
            ds.optimize.optimize_indices(index_names=[index])
        else:
            return False
        return True


def _as_table(name: str, rows: pa.Table | list[dict]) -> pa.Table:
    schema = SCHEMAS[name]
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def dedupe(data: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the first row of each key within one batch (merge_insert rejects duplicate source keys)."""
    seen, keep = set(), []
    cols = [data.column(k).to_pylist() for k in keys]
    for i, key in enumerate(zip(*cols)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return data if len(keep) == data.num_rows else data.take(keep)


def _none_last(key):
    """Sort key of a value or a tuple of values, with None after every value (SQL's NULLS LAST)."""
    return tuple((v is None, v) for v in key) if isinstance(key, tuple) else (key is None, key)


def _present_keys(ds, keys: list[str], first_values: Iterable, chunk: int = PRESENT_LOOKUP_CHUNK) -> set[tuple]:
    """The key tuples (columns `keys`) of dataset `ds` whose first key is among `first_values`, looked up
    `chunk` values per `IN (...)` filter (no full read)."""
    values = list(dict.fromkeys(first_values))
    present = set()
    for start in range(0, len(values), chunk):
        found = ds.to_table(columns=keys, filter=sql_in(keys[0], values[start : start + chunk]))
        present.update(zip(*(found.column(k).to_pylist() for k in keys)))
    return present


def _drop_present(tbl, data: pa.Table, keys: list[str]) -> pa.Table:
    """Rows of `data` whose key is not yet in `tbl`, looked up by the batch's own values of the first key
    column (no full scan)."""
    present = _present_keys(tbl.to_lance(), keys, data.column(keys[0]).to_pylist())
    if not present:
        return data
    cols = [data.column(k).to_pylist() for k in keys]
    keep = [i for i, key in enumerate(zip(*cols)) if key not in present]
    return data.take(pa.array(keep, pa.int64()))
