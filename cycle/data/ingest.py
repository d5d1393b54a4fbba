"""Ingest your own (image, alt-text) pairs into the run's `samples` table.

Sources: an image folder with captions (captions.csv / captions.jsonl / `<stem>.txt` / `<stem>.json`),
webdataset tar shards as img2dataset writes them, or parquet files with image bytes or paths. Reading
streams; writes are batched (`write_batch` rows per commit). Every pair that is not ingested goes to the
`rejects` table with its reason and detail, and is counted in the returned `IngestReport`.

Reject reasons: from the image check "empty_image", "corrupt_image", "too_large", "too_small",
"unsupported_format"; from the text "empty_text", "non_utf8_text"; from the readers "missing_text",
"missing_image", "bad_caption_record", "duplicate_caption", "corrupt_shard"; and "duplicate_id",
"non_utf8_key", "bad_id".

Ids are stable and source-derived (see `cycle.data.readers`), with an optional prefix to keep several
sources apart. They are kept as given (they are the user's keys) and are data, never paths or markup:
whatever writes a file per sample names it with `cycle.files.safe_name(id)`. Only ids that nothing can
show or store faithfully are rejected ("bad_id": empty, or with a control character such as a newline).
An id already in `samples` (from this ingest or an earlier one) is rejected as "duplicate_id": the first
wins, so ingesting the same source twice adds nothing to `samples`. That check holds no set of every id:
pairs are read `lookup_rows` ahead, and their ids looked up in `samples` with one `IN (...)` filter
(`_SeenIds`), so memory stays flat in the size of the table and the source. Rejects are stored once per
(source, key, reason): ingesting a source again does not add its rejects again.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

from ..config import DataConfig, StoreConfig
from ..store import PRESENT_LOOKUP_CHUNK, Store
from . import DataError, DataNotFound
from .images import IMAGE_EXTENSIONS, BadImage, BadText, check_image, clean_alt_text
from .readers import RawPair, expand_sources, read_folder, read_parquet, read_shards

KINDS = ("folder", "wds", "parquet", "auto")
REPORT_TABLE_MIN_WIDTH = 60  # columns: room for a source path in the title
# A large `samples` table's id index (`Store.index_keys`) takes in the rows written since every this many
# rows, so the duplicate lookups scan at most this many unindexed ids.
ID_INDEX_REFRESH_ROWS = 1_000_000


@dataclass
class IngestReport:
    source: str
    kind: str
    split: str
    ingested: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> rows
    samples_version: Optional[int] = None
    seconds: float = 0.0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "split": self.split,
            "ingested": self.ingested,
            "rejected": dict(sorted(self.rejected.items())),
            "samples_version": self.samples_version,
            "seconds": round(self.seconds, 3),
        }


def detect_kind(source: str | Path) -> str:
    """ "wds" for .tar files (or a directory of them), "parquet" likewise, else "folder" for a directory."""
    path = Path(source)
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file()]
        if any(n.endswith(".tar") for n in names):
            return "wds"
        if any(n.endswith(".parquet") for n in names) and not any(n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
            return "parquet"
        return "folder"
    text = str(source)
    for suffix, kind in ((".tar", "wds"), (".parquet", "parquet")):
        if text.endswith(suffix) or text.endswith(suffix + "}"):
            return kind
    if not path.exists():
        raise DataNotFound(f"source '{source}' does not exist")
    raise DataError(f"source '{source}': cannot tell its kind; pass kind= one of folder, wds, parquet")


def open_source(
    source: str | Path, kind: str, image_column=None, text_column=None, id_column=None
) -> tuple[Iterator[RawPair], Optional[int]]:
    """The reader for a source and, where cheap to know, how many pairs it holds (for the progress bar)."""
    if kind == "folder":
        if not Path(source).is_dir():
            raise DataNotFound(f"image folder '{source}' does not exist")
        return read_folder(source), None
    if kind == "wds":
        return read_shards(expand_sources(source, ".tar")), None
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .readers import parquet_columns

        files = expand_sources(source, ".parquet")
        total = 0
        for f in files:  # every file's columns checked before the first row is written
            try:
                meta = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise DataError(f"parquet file '{f}' cannot be read: {reason}") from None
            parquet_columns(meta.schema_arrow, str(f), image_column, text_column, id_column)
            total += meta.metadata.num_rows
        return read_parquet(files, image_column, text_column, id_column), total
    raise DataError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")


def ingest(
    source: str | Path,
    store: Store,
    kind: str = "auto",
    split: str = "train",
    cfg: Optional[DataConfig] = None,
    progress: bool = True,
    *,
    write_batch: int = StoreConfig.write_batch,
    id_prefix: str = "",
    image_column: Optional[str] = None,
    text_column: Optional[str] = None,
    id_column: Optional[str] = None,
    lookup_rows: int = PRESENT_LOOKUP_CHUNK,
) -> IngestReport:
    """Read pairs from `source`, check them, and append the good ones to `samples` (split `split`).

    `cfg` gives the image limits (`max_pixels`, `min_side`); the parquet column names are detected
    unless given. A source that cannot be read at all (missing, no recognisable columns) raises before
    anything is written; everything else is a per-row reject. `lookup_rows`: pairs read ahead whose ids
    are looked up in `samples` at once (the duplicate check); it changes no outcome, only memory and speed.
    """
    cfg = cfg or DataConfig()
    if kind == "auto":
        kind = detect_kind(source)
    pairs, total = open_source(source, kind, image_column, text_column, id_column)
    report = IngestReport(str(source), kind, split)
    started = time.perf_counter()
    seen = _SeenIds(store)
    rows: list[dict] = []
    rejects: list[dict] = []
    store.index_keys("samples")  # a large table's ids are looked up in its index
    unindexed = 0

    def flush() -> None:
        nonlocal unindexed
        if rows:
            if unindexed >= ID_INDEX_REFRESH_ROWS:
                store.index_keys("samples")
                unindexed = 0
            report.samples_version = store.append("samples", rows)
            unindexed += len(rows)
            rows.clear()
        if rejects:
            store.insert_new("rejects", rejects)  # a reject stored by an earlier ingest is not stored again
            rejects.clear()

    bar = tqdm(pairs, total=total, desc=f"ingest {kind}", unit="row", disable=not progress, dynamic_ncols=True)
    pending = iter(bar)
    while chunk := list(itertools.islice(pending, max(1, lookup_rows))):
        seen.look_up(
            [id_prefix + p.id for p in chunk if p.error is None and _id_check(p.id, id_prefix) is None],
            [r["id"] for r in rows],
        )
        for pair in chunk:
            reason, detail, row = _check(pair, cfg, seen, id_prefix, split)
            if row is None:
                report.rejected[reason] += 1
                rejects.append(
                    {
                        "source": _printable(pair.source),
                        "key": _printable(pair.key),
                        "reason": reason,
                        "detail": _printable(detail),
                    }
                )
                bar.set_postfix(rejected=report.rejected_total, refresh=False)
            else:
                seen.add(row["id"])
                rows.append(row)
                report.ingested += 1
            if len(rows) >= write_batch or len(rejects) >= write_batch:
                flush()
        del chunk  # its images go with it, before the next chunk is read
    flush()
    bar.close()
    if report.samples_version is None and store.has("samples"):
        report.samples_version = store.table("samples").version
    report.seconds = time.perf_counter() - started
    return report


class _SeenIds:
    """The ids ingest refuses as duplicates, without a set of every id: those of the pairs read ahead that
    are already in `samples` (one `IN (...)` lookup per chunk of pairs), plus those accepted since that
    lookup (committed since, or still waiting for their commit). Holds at most a chunk and a write batch."""

    def __init__(self, store: Store):
        self.store = store
        self.present: set[str] = set()
        self.recent: set[str] = set()

    def look_up(self, ids: list[str], uncommitted: list[str]) -> None:
        self.present = self.store.present("samples", ids)
        self.recent = set(uncommitted)

    def add(self, sample_id: str) -> None:
        self.recent.add(sample_id)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.present or sample_id in self.recent


def _id_check(raw_id: str, id_prefix: str) -> Optional[tuple[str, str]]:
    """(reason, detail) when `id_prefix + raw_id` cannot be a sample id, else None."""
    sample_id = id_prefix + raw_id
    if _printable(sample_id) != sample_id:  # a file name that is not UTF-8 cannot be an id (nor a Lance string)
        return "non_utf8_key", f"id {_printable(sample_id)!r} is not valid UTF-8"
    problem = _id_problem(raw_id) or _id_problem(sample_id)  # the prefix is user input too
    return ("bad_id", problem) if problem else None


def _check(pair: RawPair, cfg: DataConfig, seen: _SeenIds, id_prefix: str, split: str):
    """(reason, detail, None) for a reject, or (None, None, samples row)."""
    if pair.error is not None:
        return pair.error[0], pair.error[1], None
    sample_id = id_prefix + pair.id
    bad = _id_check(pair.id, id_prefix)
    if bad:
        return bad[0], bad[1], None
    if sample_id in seen:
        return "duplicate_id", f"id '{sample_id}' is already in samples (the first copy wins)", None
    try:
        text = clean_alt_text(pair.text)
        width, height, _ = check_image(pair.image, cfg.max_pixels, cfg.min_side)
    except (BadImage, BadText) as err:
        return err.reason, err.detail, None
    return (
        None,
        None,
        {
            "id": sample_id,
            "image": pair.image,
            "alt_text": text,
            "source": pair.source,
            "split": split,
            "width": width,
            "height": height,
            "sha256": hashlib.sha256(pair.image).hexdigest(),
            "meta": pair.meta,
        },
    )


def _id_problem(raw_id: str) -> Optional[str]:
    """Why an id (as the source gave it) cannot be one, or None. Separators, dots, quotes, brackets are
    fine: ids are data everywhere. Control characters are not: they break lines and tables wherever the
    id is shown, and cannot be told apart from the id without them."""
    if not raw_id or not raw_id.strip():
        return f"empty id {raw_id!r}"
    bad = next((c for c in raw_id if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        return f"id {raw_id!r} contains the control character U+{ord(bad):04X}"
    return None


def _printable(text: str) -> str:
    """Non-UTF-8 file names arrive as lone surrogates; store them escaped rather than fail the write."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if text else text


def report_table(report: IngestReport):
    """A rich table: ingested, then rejected rows by reason."""
    from rich.table import Table
    from rich.text import Text

    # Text, not a markup string: the source path and split are the user's, printed as they are
    table = Table(
        title=Text(f"ingest {report.kind}: {report.source} -> split '{report.split}'"), min_width=REPORT_TABLE_MIN_WIDTH
    )
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_row("ingested", str(report.ingested), style="green")
    for reason, n in sorted(report.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(Text(f"rejected: {reason}"), str(n), style="red")
    table.add_row("total", str(report.ingested + report.rejected_total), style="bold")
    rate = (report.ingested + report.rejected_total) / report.seconds if report.seconds else 0.0
    table.caption = f"samples version {report.samples_version}; {report.seconds:.1f} s ({rate:.0f} rows/s)"
    return table
