"""Writing files so that a kill never leaves half of one: temp file in the same folder, fsync, rename."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> None:
    """Readers see the old file or the new one, never a part (temp file, fsync, rename, fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, default=str))


def read_json(path: str | Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def replace_dir(new: str | Path, dest: str | Path) -> Path:
    """Put the finished folder `new` at `dest` (a sibling): an existing `dest` is moved aside first and
    removed after, so a kill leaves the old folder or the new one, never a half-written one."""
    new, dest = Path(new), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


# Ids are the user's keys (parquet `id`, webdataset keys, folder paths): data, never paths. Every file name
# derived from an id goes through `safe_name`.
SAFE_SLUG_MAX = 64  # characters of the readable part; the hash keeps names unique whatever was cut
SAFE_HASH_CHARS = 16  # hex digits of sha256(id): 64 bits, no collision among any realistic number of ids
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(sample_id: str, suffix: str = "") -> str:
    """A file name for `sample_id` that stays inside the folder it is joined to: a slug of the id
    (ASCII letters, digits, `_`, `-`; no separators, no dots) plus a short hash of the full id, so two
    ids never share a name (also on case-insensitive file systems: the hash is of the exact id) and the
    same id always gets the same name. `suffix` ("png", ".json") is appended after one dot.

    No dots in the stem on purpose: webdataset takes everything up to the first dot as the key.
    """
    raw = str(sample_id).encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(raw).hexdigest()[:SAFE_HASH_CHARS]
    slug = _UNSAFE.sub("-", str(sample_id))[:SAFE_SLUG_MAX].strip("-")
    stem = f"{slug}-{digest}" if slug else digest
    suffix = suffix.lstrip(".")
    if suffix and not re.fullmatch(r"[A-Za-z0-9]{1,16}", suffix):
        raise ValueError(f"file suffix {suffix!r} is not a plain extension")
    return f"{stem}.{suffix}" if suffix else stem


def check_writable_dir(path: str | Path, what: str = "folder") -> Path:
    """Raise `HQClipError` naming `path` unless it is, or can become, a folder we can write into.

    Creates nothing: a missing folder is judged by its nearest existing parent. Writability is probed by
    creating (and removing) a temp file, not by mode bits: root passes `os.access` checks even where a
    read-only mount or a file in the way still refuses the write.
    """
    from .errors import HQClipError

    path = Path(path)
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if probe_in.exists() and not probe_in.is_dir():
        raise HQClipError(f"cannot write the {what} {path}: {probe_in} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=".hqclip-write-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise HQClipError(
            f"cannot write the {what} {path}: creating a file in {probe_in} failed ({err.strerror or err})"
        ) from None
    return path
