"""Evaluation sets: the held-out splits of a run's store, and user datasets on disk.

Every source becomes an `EvalSet`: images plus whichever task annotations it carries. The tasks follow
the keys present, the same keys as the store's `meta` JSON:
- `label` (a class name; the classes are all labels of the set) -> zero-shot classification;
- `captions` (a list) -> retrieval both ways;
- `positive` + `negatives` ([{"text", "edit"}]) -> positive-vs-negative discrimination;
- `reworded` (an object with the keys above, in other words) -> the same tasks on the same images as a
  variant set named `<set>_reworded` (the emoji-scenes held-out splits carry it, see `data.emoji.reword`).

User datasets: an image folder with one subfolder per class (the folder name is the class, `_` read as
a space), or a CSV / JSONL file with an image path column (`image`, `path`, `filepath`, `image_path` or
`file`, relative to the file) and `caption` / `captions` / `caption_N` / `text` columns, or `label`, or
(JSONL) `positive` + `negatives`. Rows naming the same image are merged (several captions per image).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ..data.images import IMAGE_EXTENSIONS, BadImage, decode_image
from ..errors import HQClipError

IMAGE_COLUMNS = ("image", "path", "filepath", "image_path", "file")
_CAPTION_COLUMN = re.compile(r"^(caption|captions|text|caption_?\d+)$")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


class EvalDataError(HQClipError, ValueError):
    """An evaluation set that cannot be used as it is; the message names the row or file."""


@dataclass
class EvalSet:
    name: str
    keys: list[str]  # row ids or image paths, for messages
    images: list[Any]  # encoded bytes or file paths
    labels: Optional[list[str]] = None
    captions: Optional[list[list[str]]] = None
    positives: Optional[list[str]] = None
    negatives: Optional[list[list[dict]]] = None  # per image: [{"text", "edit"}]
    classes: list[str] = field(default_factory=list)
    variants: list["EvalSet"] = field(default_factory=list)  # same images, other texts (`<name>_reworded`)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def tasks(self) -> list[str]:
        return [
            t
            for t, v in (("zeroshot", self.labels), ("retrieval", self.captions), ("negatives", self.positives))
            if v is not None
        ]

    def image(self, i: int) -> Image.Image:
        src = self.images[i]
        try:
            data = src if isinstance(src, (bytes, bytearray)) else Path(src).read_bytes()
            return decode_image(bytes(data))
        except (BadImage, OSError) as err:
            raise EvalDataError(f"{self.name}: image of '{self.keys[i]}' is unreadable ({err})") from None


# ----------------------------------------------------------------------------------------------- rows
def _check_captions(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise EvalDataError(f"{where}: 'captions' must be a list of strings")
    value = [c for c in value if c.strip()]
    if not value:
        raise EvalDataError(f"{where}: no non-empty caption")
    return value


def _check_negatives(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):  # a JSON list written into a CSV cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list):
        raise EvalDataError(f'{where}: \'negatives\' must be a list of {{"text", "edit"}} objects')
    out = []
    for neg in value:
        if isinstance(neg, str):
            neg = {"text": neg, "edit": "unknown"}
        if not isinstance(neg, dict) or not isinstance(neg.get("text"), str) or not neg["text"].strip():
            raise EvalDataError(f"{where}: each negative needs a non-empty 'text' (got {neg!r:.80})")
        out.append({"text": neg["text"], "edit": str(neg.get("edit") or "unknown")})
    return out


def build_set(name: str, rows: list[tuple[str, Any, dict]]) -> EvalSet:
    """(key, image, annotations) rows -> EvalSet. A task applies when any row has its key; then every row
    must have it, so a half-annotated split is an error rather than a silently smaller test."""
    if not rows:
        raise EvalDataError(f"{name}: no rows")
    has = {k: any(k in ann for _, _, ann in rows) for k in ("label", "captions", "positive")}
    if not any(has.values()):
        raise EvalDataError(f"{name}: rows carry none of 'label', 'captions', 'positive' (nothing to evaluate)")
    ev = EvalSet(name=name, keys=[r[0] for r in rows], images=[r[1] for r in rows])
    if has["label"]:
        ev.labels = []
    if has["captions"]:
        ev.captions = []
    if has["positive"]:
        ev.positives, ev.negatives = [], []
    for key, _, ann in rows:
        where = f"{name}: row '{key}'"
        if has["label"]:
            label = ann.get("label")
            if not isinstance(label, str) or not label.strip():
                raise EvalDataError(f"{where}: missing or empty 'label'")
            ev.labels.append(label.strip())
        if has["captions"]:
            if "captions" not in ann:
                raise EvalDataError(f"{where}: missing 'captions'")
            ev.captions.append(_check_captions(ann["captions"], where))
        if has["positive"]:
            pos = ann.get("positive")
            if not isinstance(pos, str) or not pos.strip():
                raise EvalDataError(f"{where}: missing or empty 'positive'")
            ev.positives.append(pos)
            ev.negatives.append(_check_negatives(ann.get("negatives", []), where))
    if ev.labels is not None:
        ev.classes = sorted(set(ev.labels))
    if ev.positives is not None and not any(ev.negatives):
        raise EvalDataError(f"{name}: 'positive' texts given but no row has a negative")
    if any("reworded" in ann for _, _, ann in rows):
        for key, _, ann in rows:
            if not isinstance(ann.get("reworded"), dict):
                raise EvalDataError(f"{name}: row '{key}': 'reworded' missing or not an object")
        ev.variants.append(build_set(f"{name}_reworded", [(k, image, ann["reworded"]) for k, image, ann in rows]))
    return ev


# ----------------------------------------------------------------------------------------------- store
def load_store_split(store, split: str, samples_version: int | str | None = None) -> EvalSet:
    """A held-out split of the run's `samples` table (at a pinned version), rows ordered by id."""
    if not _SPLIT_NAME.match(split):
        raise EvalDataError(f"split name '{split}': letters, digits, '_' and '-' only")
    table = store.read("samples", ["id", "image", "meta"], where=f"split = '{split}'", version=samples_version)
    if table.num_rows == 0:
        raise EvalDataError(
            f"split '{split}' has no rows in the store"
            + (f" at version {samples_version}" if samples_version is not None else "")
        )
    ids, images, metas = (table.column(c).to_pylist() for c in ("id", "image", "meta"))
    rows = []
    for id_, image, meta in sorted(zip(ids, images, metas), key=lambda r: r[0]):
        try:
            ann = json.loads(meta) if meta else {}
        except json.JSONDecodeError as err:
            raise EvalDataError(f"split '{split}': row '{id_}' has meta that is not JSON ({err})") from None
        if not isinstance(ann, dict):
            raise EvalDataError(f"split '{split}': row '{id_}' has meta that is not a JSON object")
        rows.append((id_, image, ann))
    return build_set(split, rows)


# ----------------------------------------------------------------------------------------------- files
def load_dataset(path: str | Path, name: Optional[str] = None) -> EvalSet:
    """A user dataset: an image folder (one subfolder per class), a .csv/.tsv or a .jsonl/.json file."""
    path = Path(path)
    name = name or path.stem
    if path.is_dir():
        return load_image_folder(path, name)
    if not path.is_file():
        raise EvalDataError(f"dataset '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return load_caption_csv(path, name)
    if suffix in (".jsonl", ".json"):
        return load_jsonl(path, name)
    raise EvalDataError(f"dataset '{path}': expected a folder, .csv, .tsv, .jsonl or .json")


def load_image_folder(path: Path, name: str) -> EvalSet:
    rows = []
    for class_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_dir.name.replace("_", " ").strip()
        for f in sorted(class_dir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append((str(f.relative_to(path)), f, {"label": label}))
    if not rows:
        raise EvalDataError(f"dataset folder '{path}': no class subfolders with images ({', '.join(IMAGE_EXTENSIONS)})")
    return build_set(name, rows)


def _merge_rows(path: Path, name: str, records: list[tuple[str, dict]]) -> EvalSet:
    """Resolve image paths (relative to the file), merge rows of one image, check the files exist."""
    merged: dict[Path, tuple[str, dict]] = {}
    missing = []
    for where, rec in records:
        image = next((rec[c] for c in IMAGE_COLUMNS if rec.get(c)), None)
        if not isinstance(image, str):
            raise EvalDataError(f"{where}: no image path (a column named one of {', '.join(IMAGE_COLUMNS)})")
        file = Path(image) if Path(image).is_absolute() else (path.parent / image).resolve()
        if not file.is_file():
            missing.append(image)
            continue
        _, ann = merged.setdefault(file, (image, {}))
        for key, value in rec.items():
            if _CAPTION_COLUMN.match(key) and value not in (None, ""):
                ann.setdefault("captions", []).extend(_caption_list(value))
        for key in ("label", "positive", "negatives"):
            if rec.get(key) not in (None, ""):
                if key in ann and ann[key] != rec[key]:
                    raise EvalDataError(f"{where}: image '{image}' has two different '{key}' values")
                ann[key] = rec[key]
    if missing:
        raise EvalDataError(
            f"dataset '{path}': {len(missing)} image file(s) not found, e.g. " + ", ".join(repr(m) for m in missing[:5])
        )
    return build_set(name, [(image, file, ann) for file, (image, ann) in merged.items()])


def _caption_list(value: Any) -> list:
    """A caption cell: a string, a list (JSONL), or a JSON list written into a CSV cell."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            parsed = json.loads(value)
            if isinstance(parsed, list):
                return parsed
        except json.JSONDecodeError:
            pass
    return value if isinstance(value, list) else [value]


def load_caption_csv(path: Path, name: str) -> EvalSet:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if not reader.fieldnames:
                raise EvalDataError(f"dataset '{path}' is empty (a header row is required)")
            fields = [f.strip().lower() for f in reader.fieldnames]
            records = []
            for n, row in enumerate(reader, start=2):
                rec = {f: (v.strip() if isinstance(v, str) else v) for f, v in zip(fields, row.values())}
                records.append((f"{path.name}: line {n}", rec))
    except UnicodeDecodeError as err:
        raise EvalDataError(f"dataset '{path}' is not UTF-8 text ({err})") from None
    if not records:
        raise EvalDataError(f"dataset '{path}' has a header but no rows")
    return _merge_rows(path, name, records)


def load_jsonl(path: Path, name: str) -> EvalSet:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise EvalDataError(f"dataset '{path}' is not UTF-8 text ({err})") from None
    records = []
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalDataError(f"dataset '{path}' is not valid JSON ({err})") from None
        lines = [(f"{path.name}: item {i}", obj) for i, obj in enumerate(items)]
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((f"{path.name}: line {n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise EvalDataError(f"dataset '{path}': line {n} is not valid JSON ({err.msg})") from None
    for where, obj in lines:
        if not isinstance(obj, dict):
            raise EvalDataError(f"{where}: expected a JSON object")
        records.append((where, {str(k).lower(): v for k, v in obj.items()}))
    if not records:
        raise EvalDataError(f"dataset '{path}' has no rows")
    return _merge_rows(path, name, records)
