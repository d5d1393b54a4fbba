"""Torch loading from the run's LanceDB store: a map-style dataset, a resumable sampler, a loader.

- `PairDataset` reads a *pinned* version of `samples` (one split), optionally joined with one
  generation's `annotations` and/or the `teacher` table. The index (which rows, where their annotation
  sits) is built once from a few small columns; images are fetched by position with `LanceDataset.take`
  and decoded in the worker.
- `ResumableSampler` yields each rank's share of every global batch; the order is a pure function of
  (seed, epoch), and `state_dict()` records where the run stands so a resumed run takes the exact next
  sample.
- `make_loader` builds the `DataLoader`: "spawn" workers (Lance is not fork-safe: a forked worker of a
  parent that touched Lance segfaults), and exact consumption tracking for the sampler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset

from ..store import FORMULAS, is_local
from . import DataError, DataNotFound
from .images import decode_image
from .sampler import ResumableSampler

__all__ = ["PairDataset", "ResumableSampler", "make_loader", "collate_pairs", "image_to_tensor"]

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

    Each item is a dict: `id`, `image` (transformed), `alt_text`, any extra columns, and when a join is
    asked for: `desc`, `neg_desc`, `tags`, `neg_tags` (lists; empty when the row has no annotation),
    `annotated` (bool) and `text_source` ("annotations", "teacher" or ""). Annotations with status
    "failed" count as absent.
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
        index = self._handle("samples").to_table(columns=["id", "split"])
        if split is None:
            rows = np.arange(index.num_rows, dtype=np.int64)
        else:
            rows = np.flatnonzero(pc.equal(index.column("split"), split).to_numpy(zero_copy_only=False))
        ids = index.column("id").take(pa.array(rows, pa.int64()))

        self.joined = generation is not None or teacher_version is not None or use_teacher
        self._ann_rows = self._teacher_rows = None
        if generation is not None:
            self._pin("annotations", annotations_version)
            ann = self._handle("annotations").to_table(columns=["id", "generation", "status"])
            usable = pc.and_(
                pc.equal(ann.column("generation"), generation),
                pc.not_equal(pc.fill_null(ann.column("status"), "ok"), "failed"),
            )
            self._ann_rows = _positions_of(ids, ann.column("id"), usable)
        if teacher_version is not None or use_teacher:
            self._pin("teacher", teacher_version)
            teacher = self._handle("teacher").to_table(columns=["id"])
            self._teacher_rows = _positions_of(ids, teacher.column("id"), None)

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

    # -- Lance handles: opened lazily, once per process --------------------------------------------------
    def _pin(self, name: str, version) -> None:
        self._uris[name], self.pins[name] = _open_pinned(self.store_uri, name, version, self.storage_options)

    def _handle(self, name: str) -> lance.LanceDataset:
        if name not in self._handles:
            self._handles[name] = lance.dataset(
                self._uris[name], version=self.pins[name], storage_options=dict(self.storage_options) or None
            )
        return self._handles[name]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # each worker opens its own
        return state

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
        samples = _take(self._handle("samples"), self._rows[idx], ["id", "image", "alt_text", *self.extra_columns])
        ann = self._formulas("annotations", self._ann_rows, idx)
        teacher = self._formulas("teacher", self._teacher_rows, idx)
        first, second = (ann, teacher) if self.prefer == "annotations" else (teacher, ann)
        first_src, second_src = (
            ("annotations", "teacher") if self.prefer == "annotations" else ("teacher", "annotations")
        )
        items = []
        for i, row in enumerate(samples):
            item = {"id": row["id"], "image": self.transform(decode_image(row["image"])), "alt_text": row["alt_text"]}
            item.update({c: row[c] for c in self.extra_columns})
            if self.joined:
                found, source = (first[i], first_src) if first[i] is not None else (second[i], second_src)
                found = found or {}
                item.update({k: list(found.get(k) or []) for k in FORMULA_NAMES})
                item["annotated"] = bool(found)
                item["text_source"] = source if found else ""
            items.append(item)
        return items

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


def _positions_of(ids: pa.Array, table_ids: pa.ChunkedArray, usable: Optional[pa.ChunkedArray]) -> np.ndarray:
    """For each of `ids`, the row position of its first usable match in `table_ids`, or -1."""
    candidates = np.arange(len(table_ids), dtype=np.int64)
    if usable is not None:
        candidates = np.flatnonzero(usable.to_numpy(zero_copy_only=False))
    if len(candidates) == 0:  # nothing usable (e.g. every annotation failed): no sample has a match
        return np.full(len(ids), -1, dtype=np.int64)
    values = table_ids.take(pa.array(candidates, pa.int64()))
    found = pc.index_in(ids, value_set=values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)
    found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.where(found >= 0, candidates[np.maximum(found, 0)], -1)


def _take(ds: lance.LanceDataset, positions: np.ndarray, columns: list[str]) -> list[dict]:
    """Rows at `positions`, in that order; Lance reads them sorted, once each."""
    unique, inverse = np.unique(positions, return_inverse=True)
    rows = ds.take(unique.tolist(), columns=columns).to_pylist()
    return [rows[k] for k in inverse]


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
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler covers {sampler.num_samples} samples but the dataset has {len(dataset)}")
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
