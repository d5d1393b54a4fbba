"""`hqclip export RUN --gen G`: take a generation out of the run in formats other tools read.

- the CLIP: the open_clip checkpoint directory (loads with `open_clip.create_model_and_transforms(
  "local-dir:PATH")`) and an HF `CLIPModel` in safetensors;
- the LVLM: the merged HF LLaVA directory of that generation (gen >= 1);
- the dataset: the generation's annotations as VLM-150M JSON files (one `<name>.json` per image with
  `desc`, `neg_desc`, `tags`, `neg_tags`), or as webdataset shards (`<name>.<ext>` image, `<name>.txt`
  alt-text, `<name>.json` the four formulas) that `hqclip data ingest` and webdataset readers take back.
  `<name>` is `cycle.files.safe_name(id)` (ids are data, never paths); the exact id is the JSON's "id".
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .data.images import image_ext
from .errors import HQClipError
from .files import safe_name
from .state import RunState, missing_outputs
from .store import FORMULAS, Store, is_usable, sql_in

FORMULA_KEYS = [name for name, _ in FORMULAS]
SHARD_SIZE = 1000  # rows per webdataset shard
DATA_FORMATS = ("json", "wds")


class NothingToExport(HQClipError, ValueError):
    """The generation asked for has not got that far (a ValueError for older callers)."""


def _rows(store: Store, state: RunState, gen: int, with_images: bool, split: str) -> Iterator[dict]:
    data = state.outputs(0, "data")
    samples_version = data["samples_version"]
    columns = ["id", "alt_text"] + (["image"] if with_images else [])
    if gen == 0:
        # Generation 0 trained on raw alt-text: its "annotations" are the teacher seeds where present.
        ann = {r["id"]: r for r in store.read("teacher", version=data.get("teacher_version")).to_pylist()}
    else:
        version = state.outputs(gen, "annotate")["annotations_version"]
        ann = {r["id"]: r for r in store.read("annotations", where=f"generation = {gen}", version=version).to_pylist()}
    for batch in store.scan("samples", columns=columns, where=sql_in("split", [split]), version=samples_version):
        for row in batch.to_pylist():
            row["annotation"] = ann.get(row["id"])
            yield row


def export_dataset(
    store: Store,
    run_dir: Path,
    gen: int,
    out: Path,
    fmt: str = "json",
    shard_size: int = SHARD_SIZE,
    split: str = "train",
) -> dict:
    """Write generation `gen`'s dataset; returns counts. Failed annotations are exported with their status."""
    if fmt not in DATA_FORMATS:  # checked first: it also names the output folder
        raise HQClipError(f"dataset format '{fmt}': expected {' or '.join(DATA_FORMATS)}")
    state = RunState(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = failed = 0
    tar, shard = None, 0
    for row in tqdm(_rows(store, state, gen, fmt == "wds", split), desc=f"export gen {gen} ({fmt})", unit="row"):
        rec = row["annotation"]
        formulas = {k: (rec or {}).get(k) or [] for k in FORMULA_KEYS}
        status = (rec or {}).get("status", "ok" if rec else "absent")
        failed += not is_usable(status)
        doc = {"id": row["id"], **formulas, "alt_text": row["alt_text"], "status": status}
        if fmt == "json":
            (out / safe_name(row["id"], "json")).write_text(json.dumps(doc, ensure_ascii=False))
        elif fmt == "wds":
            if tar is None or written % shard_size == 0 and written:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(out / f"shard-{shard:05d}.tar", "w")
                shard += 1
            key = safe_name(row["id"])
            members = {
                f"{key}.{image_ext(row['image'])}": row["image"],
                f"{key}.txt": row["alt_text"].encode(),
                f"{key}.json": json.dumps(doc, ensure_ascii=False).encode(),
            }
            for name, blob in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        written += 1
    if tar is not None:
        tar.close()
    return {"rows": written, "not_ok": failed, "shards": shard}


def export_generation(
    store: Store,
    run_dir: Path,
    gen: int,
    out: Path,
    what: tuple[str, ...] = ("clip", "lvlm", "data"),
    data_format: str = "json",
) -> dict:
    if "data" in what and data_format not in DATA_FORMATS:
        raise HQClipError(f"dataset format '{data_format}': expected {' or '.join(DATA_FORMATS)}")
    state = RunState(run_dir)
    if not state.is_done(gen, "train"):
        raise NothingToExport(f"generation {gen} has no finished CLIP in {run_dir}")
    for stage in ("train", "sft") if gen > 0 and "lvlm" in what else ("train",):
        gone = missing_outputs(run_dir, state.outputs(gen, stage))
        if gone:
            raise NothingToExport(
                f"generation {gen} stage '{stage}' is recorded as done but {gone[0]} is missing: `hqclip run` redoes it"
            )
    out.mkdir(parents=True, exist_ok=True)
    done: dict = {}
    if "clip" in what:
        from .clip.export import export_hf_clip

        clip_dir = Path(state.outputs(gen, "train")["clip"])
        shutil.copytree(clip_dir, out / "clip-open_clip", dirs_exist_ok=True)
        export_hf_clip(clip_dir, out / "clip-hf")
        done["clip"] = [str(out / "clip-open_clip"), str(out / "clip-hf")]
    if "lvlm" in what and gen > 0:
        merged = Path(state.outputs(gen, "sft")["merged"])
        shutil.copytree(merged, out / "lvlm-hf", dirs_exist_ok=True)
        done["lvlm"] = str(out / "lvlm-hf")
    if "data" in what:
        done["data"] = export_dataset(store, run_dir, gen, out / f"data-{data_format}", data_format)
    return done
