"""Streaming readers of raw (image, alt-text) pairs: an image folder, webdataset shards, parquet files.

Each reader yields `RawPair`s one at a time and never holds more than one shard member or one parquet
record batch. A reader does not judge the content (that is `ingest`'s job); it only reports pairs it
could not assemble (no image, no text, an unreadable shard) with a reason, so nothing is dropped unseen.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from . import DataError, DataNotFound
from .images import IMAGE_EXTENSIONS

CAPTION_FILES = ("captions.csv", "captions.jsonl")
FILE_COLUMNS = ("file", "path", "filename", "file_name", "image")
TEXT_COLUMNS = ("alt_text", "caption", "text", "TEXT", "txt")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")
PATH_COLUMNS = ("image_path", "path", "file", "filename", "file_name")
ID_COLUMNS = ("id", "uid", "key")
JSON_TEXT_KEYS = ("caption", "alt_text", "text")


@dataclass
class RawPair:
    """One pair as read, before any check. `error` = (reason, detail) when it could not be assembled."""

    key: str  # where it is: relative file path, "shard.tar:member key", "file.parquet#row"
    id: Optional[str]
    image: Optional[bytes]
    text: Optional[bytes | str]
    source: str
    meta: Optional[str] = None
    error: Optional[tuple[str, str]] = None


def expand_sources(source: str | Path, suffix: str) -> list[Path]:
    """A file, a directory (its `*suffix` files), or a glob / brace pattern ("shard-{000..009}.tar")."""
    path = Path(source)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(suffix) and p.is_file())
    elif path.is_file():
        found = [path]
    else:
        try:
            from braceexpand import braceexpand

            patterns = list(braceexpand(str(source)))
        except ImportError:  # webdataset brings it; without it only plain globs
            patterns = [str(source)]
        found = sorted({Path(m) for p in patterns for m in glob.glob(os.path.expanduser(p))})
    if not found:
        raise DataNotFound(f"no {suffix} files found at '{source}'")
    return found


# ----------------------------------------------------------------------------------------- image folder
def _pick(names, candidates, what: str, where: str) -> str:
    for name in candidates:
        if name in names:
            return name
    raise DataError(f"{where}: no {what} column (expected one of {', '.join(candidates)}; found {', '.join(names)})")


def _sidecar_captions(root: Path) -> tuple[dict[str, bytes | str | None], list[tuple[str, str, str]]]:
    """captions.csv / captions.jsonl: (relative path or bare file name -> text, [(where, reason, detail)]
    of records not used: unparsable ones, and a second record for a file already captioned (the first
    wins, as for ids, so a later line never silently replaces an earlier one))."""
    captions: dict[str, bytes | str | None] = {}
    first_at: dict[str, str] = {}
    bad: list[tuple[str, str, str]] = []

    def add(file_key: str, text, where: str) -> None:
        file_key = _norm(file_key)
        if file_key in captions:
            bad.append(
                (
                    where,
                    "duplicate_caption",
                    f"a second caption for '{file_key}' (the first, {first_at[file_key]}, is kept)",
                )
            )
            return
        captions[file_key] = text
        first_at[file_key] = where

    csv_path, jsonl_path = root / CAPTION_FILES[0], root / CAPTION_FILES[1]
    if csv_path.is_file():
        # surrogateescape keeps non-UTF-8 bytes visible to the text check instead of failing the file
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            names = reader.fieldnames or []
            file_col = _pick(names, FILE_COLUMNS, "file", str(csv_path))
            text_col = _pick(names, TEXT_COLUMNS, "text", str(csv_path))
            for number, row in enumerate(reader, 2):
                if not row.get(file_col):
                    bad.append((f"{csv_path.name}:{number}", "bad_caption_record", "no file name"))
                    continue
                add(row[file_col], row[text_col], f"{csv_path.name}:{number}")
    if jsonl_path.is_file():
        with open(jsonl_path, encoding="utf-8", errors="surrogateescape") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    file_key = next(record[k] for k in FILE_COLUMNS if isinstance(record.get(k), str))
                except (ValueError, StopIteration, AttributeError) as err:
                    bad.append(
                        (
                            f"{jsonl_path.name}:{number}",
                            "bad_caption_record",
                            f"{type(err).__name__}: {line.strip()[:200]}",
                        )
                    )
                    continue
                add(
                    file_key,
                    next((record[k] for k in TEXT_COLUMNS if k in record), None),
                    f"{jsonl_path.name}:{number}",
                )
    return captions, bad


def _norm(rel: str) -> str:
    return rel[2:] if rel.startswith("./") else rel


def _stem(rel: str) -> str:
    directory, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{directory}/{stem}" if directory else stem


def read_folder(root: str | Path) -> Iterator[RawPair]:
    """Image files under `root` (recursively, sorted) with captions from a sidecar or `<stem>.txt`/`.json`.

    Caption precedence: captions.csv / captions.jsonl (by relative path, then by bare file name), then
    `<stem>.txt`, then the "caption" of `<stem>.json`. Id: the relative path without its extension
    ("cats/001"). Every file is accounted for: images without a caption, captions without an image and
    unparsable caption records come out as pairs with an error; any other file goes to the image check.
    Hidden files and directories (".*") are skipped.
    """
    root = Path(root)
    source = str(root.resolve())
    captions, bad = _sidecar_captions(root)
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    present = set(files)
    for where, reason, detail in bad:
        yield RawPair(where, None, None, None, source, error=(reason, detail))
    claimed = set(CAPTION_FILES)
    for rel in files:
        if rel in CAPTION_FILES or rel.endswith((".txt", ".json")):
            continue
        stem, name, meta = _stem(rel), rel.rpartition("/")[2], None
        claimed.update((stem + ".txt", stem + ".json"))
        if rel in captions or name in captions:
            key = rel if rel in captions else name
            text = captions[key]
            claimed.add(key)
        elif stem + ".txt" in present:
            text = (root / (stem + ".txt")).read_bytes()
        elif stem + ".json" in present:
            text, meta = _caption_from_json((root / (stem + ".json")).read_bytes())
        else:
            text = None
        if text is None:
            yield RawPair(
                rel, stem, None, None, source, error=("missing_text", "no caption in a sidecar, .txt or .json")
            )
            continue
        yield RawPair(rel, stem, (root / rel).read_bytes(), text, source, meta)
    orphans = [k for k in captions if k not in claimed]
    orphans += [f for f in files if f.endswith((".txt", ".json")) and f not in claimed]
    for name in orphans:
        yield RawPair(name, None, None, None, source, error=("missing_image", "a caption without its image"))


def _caption_from_json(blob: bytes) -> tuple[Optional[bytes | str], Optional[str]]:
    try:
        record = json.loads(blob)
    except ValueError:
        return None, None
    if not isinstance(record, dict):
        return None, None
    text = next((record[k] for k in JSON_TEXT_KEYS if isinstance(record.get(k), str)), None)
    return text, json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


# ----------------------------------------------------------------------------------- webdataset shards
def _group_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _assemble(shard: Path, key: str, members: dict[str, bytes]) -> RawPair:
    where = f"{shard.name}:{key}"
    text, meta = None, None
    if "json" in members:
        text, meta = _caption_from_json(members["json"])
    if "txt" in members:
        text = members["txt"]
    image_ext = next((e for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
    if image_ext is None:  # some other member might still be an image (a .tif): let the check say which
        image_ext = next((e for e in members if e not in ("txt", "json", "cls")), None)
    if image_ext is None:
        return RawPair(where, key, None, text, str(shard), meta, ("missing_image", "no image member"))
    if text is None:
        return RawPair(where, key, None, None, str(shard), meta, ("missing_text", "no .txt and no caption in .json"))
    return RawPair(where, key, members[image_ext], text, str(shard), meta)


def read_shards(shards: list[Path]) -> Iterator[RawPair]:
    """Members of tar shards as img2dataset writes them: `key.jpg|png|webp`, `key.txt`, `key.json`.

    A shard that breaks off (a bad header, a member cut short, no end-of-archive marker) gives one
    "corrupt_shard" pair naming the last key read; the pairs before it are kept, the group it was in
    the middle of is not trusted.
    """
    for shard in shards:
        current, members, error = None, {}, None
        try:
            with tarfile.open(shard, "r|*") as tar:  # streaming: one member in memory at a time
                for info in tar:
                    if not info.isfile():
                        continue
                    key, ext = _group_key(info.name)
                    if key != current and current is not None:
                        yield _assemble(shard, current, members)
                        members = {}
                    current = key
                    members[ext] = tar.extractfile(info).read()
                if not _ends_cleanly(shard, tar.offset):
                    error = "truncated: no end-of-archive marker"
        except (tarfile.TarError, OSError, EOFError) as err:
            error = f"{type(err).__name__}: {err}"
        if error:
            yield RawPair(
                shard.name,
                None,
                None,
                None,
                str(shard),
                error=("corrupt_shard", f"{error}; lost from key {current!r} on"),
            )
        elif current is not None:
            yield _assemble(shard, current, members)


def _ends_cleanly(shard: Path, offset: int) -> bool:
    """tarfile stops quietly at a cut-off header; a whole archive has a zero block where reading stopped."""
    if shard.suffix != ".tar":  # compressed: offsets are in the decompressed stream; gzip checks its own end
        return True
    with open(shard, "rb") as f:
        f.seek(offset)
        block = f.read(512)
    return len(block) == 512 and not any(block)


# ------------------------------------------------------------------------------------------ parquet
def parquet_columns(schema: pa.Schema, where: str, image_column=None, text_column=None, id_column=None):
    """(image column, its kind "bytes"|"struct"|"path", text column, id column or None) for a schema."""
    names = schema.names
    for given in (image_column, text_column, id_column):
        if given is not None and given not in names:
            raise DataError(f"{where}: no column '{given}' (found {', '.join(names)})")
    text_column = text_column or _pick(names, TEXT_COLUMNS, "text", where)
    id_column = id_column or next((c for c in ID_COLUMNS if c in names), None)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in names and _image_kind(schema.field(c).type)), None)
        image_column = image_column or next(
            (c for c in PATH_COLUMNS if c in names and pa.types.is_string(schema.field(c).type)), None
        )
    if image_column is None:
        raise DataError(
            f"{where}: no image column (bytes: {', '.join(IMAGE_COLUMNS)}; "
            f"paths: {', '.join(PATH_COLUMNS)}; found {', '.join(names)})"
        )
    kind = _image_kind(schema.field(image_column).type)
    if kind is None:
        raise DataError(f"{where}: column '{image_column}' holds neither image bytes nor paths")
    return image_column, kind, text_column, id_column


def _image_kind(dtype: pa.DataType) -> Optional[str]:
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return "bytes"
    if pa.types.is_struct(dtype) and dtype.get_field_index("bytes") >= 0:  # HF datasets' Image feature
        return "struct"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "path"
    return None


def read_parquet(
    files: list[Path], image_column=None, text_column=None, id_column=None, batch_rows: int = 256
) -> Iterator[RawPair]:
    """Rows of parquet files, one record batch in memory at a time. Paths are relative to the file."""
    for path in files:
        pf = pq.ParquetFile(path)
        image_col, kind, text_col, id_col = parquet_columns(
            pf.schema_arrow, str(path), image_column, text_column, id_column
        )
        columns = list(dict.fromkeys(c for c in (image_col, text_col, id_col) if c))
        row = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            for record in batch.to_pylist():
                where = f"{path.name}#{row}"
                rid = str(record[id_col]) if id_col and record[id_col] is not None else f"{path.stem}-{row:09d}"
                row += 1
                image, value = None, record[image_col]
                if kind == "struct" and value is not None:
                    image = value.get("bytes")
                    value = value.get("path") if image is None else None
                    kind_now = "path" if image is None else "bytes"
                else:
                    kind_now, image = kind, value if kind == "bytes" else None
                if kind_now == "path" and value:
                    file = (path.parent / value) if not os.path.isabs(value) else Path(value)
                    if not file.is_file():
                        yield RawPair(where, rid, None, None, str(path), error=("missing_image", f"no file {file}"))
                        continue
                    image = file.read_bytes()
                yield RawPair(where, rid, image if image is not None else b"", record[text_col], str(path))
