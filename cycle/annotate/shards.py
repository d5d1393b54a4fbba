"""Shards of a distributed annotation pass, and the staging table where finished shards wait for the merge.

A shard is up to `rows_per_shard` consecutive physical rows of one fragment of the pinned `samples`
version. Its id is `fragment_id << 32 | row_offset // rows_per_shard` (Lance's row address, coarsened),
so a pinned version and a shard size give the same shards on every resume, with no list of ids kept.

Workers only annotate; the controller is the one writer: it appends each shard whose rows are all in to
`annotations_staging_gNNN` (one commit per shard), and at the end merges staging into `annotations` in
one commit. A resumed pass skips the shards already in staging, so a lost worker costs its unfinished
shard only. No Ray here: this is Lance bookkeeping, tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import HQClipError
from ..store import ANNOTATIONS, Store, dedupe

ROW_OFFSET_BITS = 32  # Lance row address: fragment id in the high 32 bits, row offset in the low ones
PLAN_SCAN_ROWS = 65_536  # row addresses read per batch while counting rows per shard
MAX_RANGE_CLAUSES = 256  # a read filter names at most this many row-address ranges; beyond, whole fragments
STAGING_SCHEMA = pa.schema([*ANNOTATIONS, pa.field("shard", pa.int64())])
SHARD_SIZE_KEY, SAMPLES_VERSION_KEY = b"rows_per_shard", b"samples_version"


class StagingMismatch(HQClipError):
    """Staging begun with another shard size or samples version: its shard ids mean other rows."""


def shard_ids(rowaddr: pa.Array | pa.ChunkedArray, rows_per_shard: int) -> pa.Array:
    """The shard of each row address (an int64 array)."""
    addr = pc.cast(rowaddr, pa.int64())  # fragment ids stay below 2**31
    fragment = pc.shift_right(addr, ROW_OFFSET_BITS)
    offset = pc.bit_wise_and(addr, (1 << ROW_OFFSET_BITS) - 1)
    chunk = pc.divide(offset, rows_per_shard)  # integer division on integers
    out = pc.add(pc.shift_left(fragment, ROW_OFFSET_BITS), chunk)
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def _fragment(shard: int) -> int:
    return shard >> ROW_OFFSET_BITS


@dataclass
class ShardPlan:
    """The shards of a pinned samples version under a row filter, and how many filtered rows each holds."""

    rows_per_shard: int
    expected: dict[int, int]  # shard id -> rows it holds (the splits being annotated); #shards entries

    @property
    def rows(self) -> int:
        return sum(self.expected.values())

    def fragments(self, shards: list[int]) -> list[int]:
        return sorted({_fragment(s) for s in shards})

    def row_filter(self, shards: list[int], where: str) -> str:
        """`where` narrowed to the row-address ranges of `shards` (consecutive shards of a fragment joined),
        or `where` alone when there would be more than `MAX_RANGE_CLAUSES` ranges (the reader keeps to
        the shards' fragments and the actors drop the rows of finished shards)."""
        runs: list[list[int]] = []  # [first shard, last shard]
        for s in sorted(shards):
            if runs and s == runs[-1][1] + 1 and _fragment(s) == _fragment(runs[-1][0]):
                runs[-1][1] = s
            else:
                runs.append([s, s])
        if len(runs) > MAX_RANGE_CLAUSES:
            return where
        mask = (1 << ROW_OFFSET_BITS) - 1
        clauses = []
        for first, last in runs:
            base = _fragment(first) << ROW_OFFSET_BITS
            lo = base + (first & mask) * self.rows_per_shard
            hi = base + ((last & mask) + 1) * self.rows_per_shard
            clauses.append(f"(_rowaddr >= {lo} AND _rowaddr < {hi})")
        return f"({where}) AND ({' OR '.join(clauses)})"


def plan_shards(samples, where: str, rows_per_shard: int) -> ShardPlan:
    """Count the rows matching `where` per shard of `samples` (a pinned `LanceDataset`), reading row
    addresses only, in batches."""
    expected: dict[int, int] = {}
    for rb in samples.to_batches(columns=[], filter=where, with_row_address=True, batch_size=PLAN_SCAN_ROWS):
        counts = pc.value_counts(shard_ids(rb.column("_rowaddr"), rows_per_shard))
        for shard, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            expected[shard] = expected.get(shard, 0) + n
    return ShardPlan(rows_per_shard, expected)


def staging_name(generation: int) -> str:
    return f"annotations_staging_g{int(generation):03d}"


class Staging:
    """The per-generation staging table in the run's store (local or object storage, like the rest)."""

    def __init__(self, store: Store, generation: int, rows_per_shard: int, samples_version: int):
        self.store, self.generation, self.name = store, int(generation), staging_name(generation)
        self.rows_per_shard, self.samples_version = int(rows_per_shard), int(samples_version)
        self._table = None

    def exists(self) -> bool:
        return self.store.has(self.name)

    def table(self):
        """The staging table, created on first use; refuses one begun with other shard ids."""
        if self._table is not None:
            return self._table
        if not self.exists():
            meta = {
                SHARD_SIZE_KEY: str(self.rows_per_shard).encode(),
                SAMPLES_VERSION_KEY: str(self.samples_version).encode(),
            }
            self.store.db.create_table(self.name, schema=STAGING_SCHEMA.with_metadata(meta), exist_ok=True)
        tbl = self.store.db.open_table(self.name)
        meta = tbl.schema.metadata or {}
        size, version = meta.get(SHARD_SIZE_KEY, b"?").decode(), meta.get(SAMPLES_VERSION_KEY, b"?").decode()
        if (size, version) != (str(self.rows_per_shard), str(self.samples_version)):
            raise StagingMismatch(
                f"annotation staging of generation {self.generation} ({self.name}) was begun with "
                f"cluster.annotate.rows_per_shard={size} on samples version {version}; this pass uses "
                f"{self.rows_per_shard} on version {self.samples_version}: resume with rows_per_shard={size}"
            )
        self._table = tbl
        return tbl

    def done_shards(self) -> set[int]:
        """Shards already committed (one int per shard: small beside the rows)."""
        if not self.exists():
            return set()
        shards = self.table().to_lance().to_table(columns=["shard"]).column("shard")
        return set(pc.unique(shards).to_pylist())

    def annotators(self) -> set[str]:
        if not self.exists():
            return set()
        return set(pc.unique(self.table().to_lance().to_table(columns=["annotator"]).column("annotator")).to_pylist())

    def commit(self, rows: pa.Table) -> None:
        """Append one finished shard (rows with the staging schema): one commit, by the controller only."""
        self.table().add(rows.select(STAGING_SCHEMA.names).cast(STAGING_SCHEMA))

    def _batches(self, plan: ShardPlan) -> Iterator[pa.RecordBatch]:
        """Staging rows in batches, each shard once: a shard holding more rows than the plan gives it (a
        shard committed twice) is read alone and deduplicated by id, the guard against a double commit."""
        ds = self.table().to_lance()
        counts = pc.value_counts(ds.to_table(columns=["shard"]).column("shard"))
        doubled = [
            s
            for s, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())
            if n > plan.expected.get(s, 0)
        ]
        where = None if not doubled else f"shard NOT IN ({', '.join(map(str, doubled))})"
        names = ANNOTATIONS.names
        for rb in ds.to_batches(columns=names, filter=where):
            yield rb
        for s in doubled:
            yield from dedupe(ds.to_table(columns=names, filter=f"shard = {s}"), ["id"]).to_batches()

    def merge_into_annotations(self, plan: ShardPlan) -> int:
        """Insert staging's rows absent from `annotations` in ONE commit (insert-if-absent on id and
        generation); returns the rows inserted. Staging stays until `drop` (a merge cut short is redone)."""
        if not self.exists() or self.table().count_rows() == 0:
            return 0
        reader = pa.RecordBatchReader.from_batches(ANNOTATIONS, (rb.cast(ANNOTATIONS) for rb in self._batches(plan)))
        result = (
            self.store.table("annotations")
            .merge_insert(["id", "generation"])
            .when_not_matched_insert_all()
            .execute(reader)
        )
        return int(result.num_inserted_rows)

    def drop(self) -> None:
        if self.exists():
            self.store.db.drop_table(self.name)
        self._table = None


def staging_plan(store: Store, samples_version: int | str, where: str, rows_per_shard: int) -> tuple[ShardPlan, int]:
    """The shard plan of the pinned samples version and that version as an int (a tag resolved)."""
    samples = store.table("samples", samples_version).to_lance()
    return plan_shards(samples, where, rows_per_shard), samples.version


def merge_leftover_staging(
    store: Store, generation: int, samples_version: int | str, where: str, check_annotator
) -> Optional[int]:
    """Merge and drop a staging table a pass on Ray left (the pass now runs locally); None if there is none.
    `check_annotator(fingerprint)` refuses staging written by another annotator."""
    if not store.has(staging_name(generation)):
        return None
    meta = store.db.open_table(staging_name(generation)).schema.metadata or {}
    rows_per_shard = int(meta.get(SHARD_SIZE_KEY, b"0") or 0) or 1
    plan, version = staging_plan(store, samples_version, where, rows_per_shard)
    staging = Staging(store, generation, rows_per_shard, version)
    for fingerprint in staging.annotators():
        check_annotator(fingerprint)
    merged = staging.merge_into_annotations(plan)
    staging.drop()
    return merged
