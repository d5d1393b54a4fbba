"""Torch loading from the run's LanceDB store: a map-style dataset, a resumable sampler, a loader.

- `PairDataset` reads a *pinned* version of `samples` (one split, optionally one range of its rows: a
  rank's shard), optionally joined with one generation's `annotations` and/or the `teacher` table. The
  index (which rows, where their annotation sits) is built by the process that reads them, streaming a
  few small columns in chunks, and holds entries for its own rows only; images are fetched by position
  with `LanceDataset.take` and decoded in the worker.
- `split_size`: how many rows a split has at a version (a Lance count, no index).
- `ResumableSampler` yields each rank's share of every global batch; the order is a pure function of
  (seed, epoch), and `state_dict()` records where the run stands so a resumed run takes the exact next
  sample.
- `make_loader` builds the `DataLoader`: "spawn" workers (Lance is not fork-safe: a forked worker of a
  parent that touched Lance segfaults), and exact consumption tracking for the sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from ..store import FORMULAS, USABLE_STATUSES, is_local
from . import DataError, DataNotFound
from .images import decode_image
from .sampler import ResumableSampler

__all__ = [
    "PairDataset",
    "ResumableSampler",
    "make_loader",
    "collate_pairs",
    "image_to_tensor",
    "split_size",
    "pinned_version",
]

FORMULA_NAMES = [name for name, _ in FORMULAS]


def image_to_tensor(image) -> torch.Tensor:
    """The default transform: float CHW in [0, 1] at the stored size (pass open_clip's preprocess instead)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def _open_pinned(store_uri: str, name: str, version, storage_options=None) -> tuple[str, int]:
    """Resolve a table at a version (int, tag or None = latest now) to (dataset uri, int version)."""
    if is_local(store_uri) and not Path(store_uri).is_dir():
        raise DataNotFound(f"no LanceDB store at '{store_uri}'")
    db = lancedb.connect(store_uri, storage_options=dict(storage_options or {}) or None)
    names = db.list_tables()
    if name not in list(getattr(names, "tables", names)):
        raise DataNotFound(f"store '{store_uri}' has no table '{name}'")
    tbl = db.open_table(name)
    if version is not None:
        try:
            tbl.checkout(version)
        except Exception as err:
            raise DataError(f"table '{name}' has no version or tag {version!r}: {err}") from None
    ds = tbl.to_lance()
    return ds.uri, ds.version


class PairDataset(Dataset):
    """(image, alt-text) pairs of one split at a pinned version, optionally with their annotations.

    Args:
        store_uri: the run's LanceDB database (`<run>/lance`, or an object store URI such as `s3://b/run`).
        split: rows whose `split` equals this; None takes every split.
        samples_version / annotations_version / teacher_version: an int version, a tag ("gen-001"), or None
            for the latest version at construction time. Whatever they are, they are resolved to ints
            once (see `pins`), so the dataset never moves under a running job.
        generation: join the `annotations` rows of this generation (with `annotations_version=None`
            the latest annotations version is pinned).
        teacher_version: join the `teacher` table table at this version or tag; `use_teacher=True` joins its
            latest version (None alone means no teacher join).
        transform: PIL RGB image -> tensor, run in the worker (default `image_to_tensor`).
        prefer: when a row has both, which formulas win: "annotations" (default) or "teacher".
        only_annotated: keep only rows with a joined annotation (e.g. SFT over the seed ids).
        extra_columns: more `samples` columns to return as they are (e.g. "meta", "sha256").
        storage_options: Lance storage options of an object store (`Store.storage_options`); they are
            pickled with the dataset, so DataLoader workers and spawned ranks open it the same way.
        row_range: (start, stop) of the split's rows, in table order: only those are indexed and read
            (a training rank's own shard, `ResumableSampler.owned_rows`); `only_annotated` applies after.
        cache_bytes: keep each item read (its decoded image and texts) while the kept images' pixels take
            less than this many bytes, and serve it from memory when read again (transformed anew: the
            transform may be random). For a training loop that reads every row every epoch; 0 (default)
            keeps nothing. Per process: each DataLoader worker keeps its own.

    Each item is a dict: `id`, `image` (transformed), `alt_text`, any extra columns, and when a join is
    asked for: `desc`, `neg_desc`, `tags`, `neg_tags` (lists; empty when the row has no annotation),
    `annotated` (bool) and `text_source` ("annotations", "teacher" or ""). Annotations that are not
    usable (`store.USABLE_STATUSES`: failed, or no status) count as absent.
    """

    def __init__(
        self,
        store_uri,
        split: Optional[str] = "train",
        samples_version=None,
        annotations_version=None,
        generation: Optional[int] = None,
        teacher_version=None,
        transform: Optional[Callable] = None,
        *,
        use_teacher: bool = False,
        prefer: str = "annotations",
        only_annotated: bool = False,
        extra_columns: Sequence[str] = (),
        storage_options: Optional[Mapping[str, str]] = None,
        row_range: Optional[tuple[int, int]] = None,
        cache_bytes: int = 0,
    ):
        if annotations_version is not None and generation is None:
            raise ValueError("annotations_version given without generation: say which generation to join")
        if prefer not in ("annotations", "teacher"):
            raise ValueError(f"prefer={prefer!r}: expected 'annotations' or 'teacher'")
        self.store_uri = str(store_uri)
        self.storage_options = storage_options if storage_options is not None else {}
        self.split = split
        self.transform = transform or image_to_tensor
        self.prefer = prefer
        self.extra_columns = list(extra_columns)
        self.generation = generation
        self._uris: dict[str, str] = {}
        self.pins: dict[str, int] = {}
        self._handles: dict[str, lance.LanceDataset] = {}  # per process; dropped when pickled

        self._pin("samples", samples_version)
        rows, ids = split_positions(self._handle("samples"), split, row_range)

        self.joined = generation is not None or teacher_version is not None or use_teacher
        self._ann_rows = self._teacher_rows = None
        if generation is not None:
            self._pin("annotations", annotations_version)

            def usable(batch: pa.RecordBatch) -> pa.Array:
                return pc.and_(
                    pc.equal(batch.column("generation"), generation),
                    pc.fill_null(pc.is_in(batch.column("status"), pa.array(USABLE_STATUSES)), False),
                )

            self._ann_rows = first_positions(self._handle("annotations"), ids, ["generation", "status"], usable)
        if teacher_version is not None or use_teacher:
            self._pin("teacher", teacher_version)
            self._teacher_rows = first_positions(self._handle("teacher"), ids, [], None)

        if only_annotated:
            if not self.joined:
                raise ValueError("only_annotated=True needs a join (generation= or teacher_version=)")
            has = np.zeros(len(rows), dtype=bool)
            for found in (self._ann_rows, self._teacher_rows):
                if found is not None:
                    has |= found >= 0
            rows = rows[has]
            self._ann_rows = None if self._ann_rows is None else self._ann_rows[has]
            self._teacher_rows = None if self._teacher_rows is None else self._teacher_rows[has]
        self._rows = rows
        self.cache_bytes = cache_bytes
        self._cache: dict[int, dict] = {}  # index -> decoded item, while the pixels held stay under cache_bytes
        self._cached_bytes = 0

    # -- Lance handles: opened lazily, once per process --------------------------------------------------
    def _pin(self, name: str, version) -> None:
        self._uris[name], self.pins[name] = _open_pinned(self.store_uri, name, version, self.storage_options)

    def _handle(self, name: str) -> lance.LanceDataset:
        if name not in self._handles:
            self._handles[name] = lance.dataset(
                self._uris[name], version=self.pins[name], storage_options=dict(self.storage_options) or None
            )
        return self._handles[name]

    # -- items ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """A whole batch with one `take` per table (what the DataLoader calls with a batch sampler)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} rows")
        idx = idx % max(len(self), 1)  # one key per row for the cache
        raw = [self._cache.get(int(i)) for i in idx]
        if any(item is None for item in raw):
            raw = self._read(idx)
            for i, item in zip(idx.tolist(), raw):
                size = _image_bytes(item["image"])
                if i not in self._cache and self._cached_bytes + size < self.cache_bytes:
                    self._cache[i] = item
                    self._cached_bytes += size
        # a new image tensor and new lists each time: what the caller changes is never the kept item
        return [
            {k: self.transform(v) if k == "image" else list(v) if isinstance(v, list) else v for k, v in item.items()}
            for item in raw
        ]

    def _read(self, idx: np.ndarray) -> list[dict]:
        """The rows' items with their images decoded, not yet transformed."""
        samples = _take(self._handle("samples"), self._rows[idx], ["id", "image", "alt_text", *self.extra_columns])
        ann = self._formulas("annotations", self._ann_rows, idx)
        teacher = self._formulas("teacher", self._teacher_rows, idx)
        first, second = (ann, teacher) if self.prefer == "annotations" else (teacher, ann)
        first_src, second_src = (
            ("annotations", "teacher") if self.prefer == "annotations" else ("teacher", "annotations")
        )
        items = []
        for i, row in enumerate(samples):
            item = {"id": row["id"], "image": decode_image(row["image"]), "alt_text": row["alt_text"]}
            item.update({c: row[c] for c in self.extra_columns})
            if self.joined:
                found, source = (first[i], first_src) if first[i] is not None else (second[i], second_src)
                found = found or {}
                item.update({k: list(found.get(k) or []) for k in FORMULA_NAMES})
                item["annotated"] = bool(found)
                item["text_source"] = source if found else ""
            items.append(item)
        return items

    def __getstate__(self):  # each worker opens its own handles and fills its own cache
        state = self.__dict__.copy()
        state["_handles"], state["_cache"], state["_cached_bytes"] = {}, {}, 0
        return state

    def _formulas(self, name: str, positions: Optional[np.ndarray], idx: np.ndarray) -> list[Optional[dict]]:
        if positions is None:
            return [None] * len(idx)
        pos = positions[idx]
        present = np.flatnonzero(pos >= 0)
        out: list[Optional[dict]] = [None] * len(idx)
        if present.size:
            for j, row in zip(present, _take(self._handle(name), pos[present], FORMULA_NAMES)):
                out[j] = row
        return out


# Rows per chunk when streaming a table for the index: big enough that hashing the looked-up ids once
# per chunk stays cheap against the scan, small enough that a chunk is not the table.
INDEX_CHUNK_ROWS = 1 << 20


def _chunks(ds: lance.LanceDataset, columns: list[str], rows: int) -> Iterator[tuple[int, pa.Table]]:
    """(position of the first row, table of at least `rows` rows but the last) over `ds` in table order."""
    pending, count, offset = [], 0, 0
    for batch in ds.to_batches(columns=columns, scan_in_order=True):
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield offset, pa.Table.from_batches(pending)
            pending, offset, count = [], offset + count, 0
    if pending:
        yield offset, pa.Table.from_batches(pending)


def split_positions(ds: lance.LanceDataset, split: Optional[str], row_range) -> tuple[np.ndarray, pa.Array]:
    """Table positions and ids of the split's rows number `row_range[0]` to `row_range[1] - 1`
    (all of them when None), in table order; only those are kept while the columns stream past."""
    start, stop = row_range if row_range is not None else (0, None)
    positions, ids, seen = [], [], 0  # seen: rows of the split before this chunk
    for offset, chunk in _chunks(ds, ["id", "split"], INDEX_CHUNK_ROWS):
        if split is None:
            local = np.arange(chunk.num_rows, dtype=np.int64)
        else:
            local = np.flatnonzero(pc.equal(chunk.column("split"), split).to_numpy(zero_copy_only=False))
        lo = min(max(start - seen, 0), len(local))
        hi = len(local) if stop is None else min(max(stop - seen, 0), len(local))
        if lo < hi:
            positions.append(offset + local[lo:hi])
            ids.append(chunk.column("id").take(pa.array(local[lo:hi], pa.int64())).combine_chunks())
        seen += len(local)
        if stop is not None and seen >= stop:
            break
    if stop is not None and seen < stop:
        raise DataError(f"rows {start}..{stop} asked of split {split!r}, which has {seen}")
    if not positions:
        return np.empty(0, dtype=np.int64), pa.array([], pa.string())
    return np.concatenate(positions).astype(np.int64), pa.concat_arrays(ids)


def first_positions(
    ds: lance.LanceDataset, ids: pa.Array, columns: list[str], usable: Optional[Callable]
) -> np.ndarray:
    """For each of `ids`, the table position of its first row in `ds` that `usable` accepts, or -1.

    Streams `ds` in chunks and looks each chunk's ids up among `ids` (one hash of them per chunk): what
    stays in memory is one entry per id asked for, whatever the table's size."""
    found = np.full(len(ids), -1, dtype=np.int64)
    if len(ids) == 0:
        return found
    for offset, chunk in _chunks(ds, ["id", *columns], max(len(ids), INDEX_CHUNK_ROWS)):
        candidates = np.arange(chunk.num_rows, dtype=np.int64)
        if usable is not None:
            candidates = np.flatnonzero(usable(chunk).to_numpy(zero_copy_only=False))
        if not len(candidates):
            continue
        where = pc.index_in(chunk.column("id").take(pa.array(candidates, pa.int64())), value_set=ids)
        where = pc.fill_null(where, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        hit = where >= 0
        targets, first = np.unique(where[hit], return_index=True)  # an id's first usable row in the chunk
        fresh = found[targets] < 0  # an earlier chunk's row comes first
        found[targets[fresh]] = offset + candidates[hit][first[fresh]]
    return found


def open_pinned_dataset(store_uri, name: str, version: int, storage_options=None) -> lance.LanceDataset:
    """Table `name` of the store at an int version, as a Lance dataset (for a streamed read of it)."""
    uri, version = _open_pinned(str(store_uri), name, version, storage_options)
    return lance.dataset(uri, version=version, storage_options=dict(storage_options or {}) or None)


def pinned_version(store_uri, name: str, version, storage_options=None) -> int:
    """`version` (an int, a tag, or None = latest now) of table `name` as the int that pins it."""
    return _open_pinned(str(store_uri), name, version, storage_options)[1]


def split_size(store_uri, split: Optional[str], samples_version, storage_options=None) -> tuple[int, int]:
    """(rows of `split` in `samples`, the int version counted): a Lance count, nothing per row in memory."""
    version = pinned_version(store_uri, "samples", samples_version, storage_options)
    ds = open_pinned_dataset(store_uri, "samples", version, storage_options)
    if split is None:
        return ds.count_rows(), version
    return ds.count_rows(filter="split = '{}'".format(split.replace("'", "''"))), version


def _take(ds: lance.LanceDataset, positions: np.ndarray, columns: list[str]) -> list[dict]:
    """Rows at `positions`, in that order; Lance reads them sorted, once each."""
    unique, inverse = np.unique(positions, return_inverse=True)
    rows = ds.take(unique.tolist(), columns=columns).to_pylist()
    return [rows[k] for k in inverse]


def _image_bytes(image) -> int:
    """The pixel bytes of a decoded (PIL) image."""
    return image.width * image.height * len(image.getbands())


def collate_pairs(items: list[dict]) -> dict:
    """Stack tensors of one shape (images), booleans into a tensor; keep texts and lists as lists."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        else:
            batch[key] = values
    return batch


class _TrackingLoader(DataLoader):
    """A DataLoader that tells its `ResumableSampler` how many batches the caller has really taken.

    With workers the loader pulls indices ahead of the caller (prefetch); the sampler alone would then
    save a position past samples never trained on.
    """

    def __iter__(self):
        iterator = super().__iter__()  # has called iter(sampler), and with workers prefetched already
        sampler: ResumableSampler = self.batch_sampler
        epoch, start = sampler.iter_origin
        for taken, batch in enumerate(iterator, 1):
            sampler.mark_consumed(epoch, start, taken)
            yield batch


def make_loader(
    dataset: Dataset,
    batch_size: Optional[int] = None,
    sampler=None,
    num_workers: int = 0,
    collate_fn: Callable = collate_pairs,
    *,
    multiprocessing_context: str = "spawn",
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset` that is safe with Lance and resumable with a `ResumableSampler`.

    With a `ResumableSampler` the sampler forms the batches (`batch_size` may be omitted, or equal the
    sampler's global or per-rank batch size) and its `state_dict()` counts the batches the caller has
    taken, not those prefetched. Any other sampler (or None: sequential) is batched by `batch_size`.
    Workers start with "spawn" (or "forkserver"), never "fork", and open Lance themselves.
    """
    if multiprocessing_context not in ("spawn", "forkserver"):
        raise ValueError(f"multiprocessing_context={multiprocessing_context!r}: Lance needs 'spawn' or 'forkserver'")
    worker_args = {}
    if num_workers > 0:
        worker_args = {
            "multiprocessing_context": multiprocessing_context,
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
        }
    if isinstance(sampler, ResumableSampler):
        if batch_size not in (None, sampler.batch_size, sampler.local_batch_size):
            raise ValueError(
                f"batch_size={batch_size} disagrees with the sampler's batch size "
                f"{sampler.batch_size} (per rank {sampler.local_batch_size})"
            )
        start, stop = sampler.owned_rows
        if stop - start != len(dataset):
            raise ValueError(f"sampler covers {stop - start} samples of this rank but the dataset has {len(dataset)}")
        return _TrackingLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            **worker_args,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size or 1,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        **worker_args,
    )
