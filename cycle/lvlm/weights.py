"""The saved LLaVA's weight files: the llava-hf key layout, one file per part, equal parts stored once.

Keys: transformers 5 saves the tower as `vision_tower.<...>`; vLLM's LLaVA (and transformers 4) load the
llava-hf layout `vision_tower.vision_model.<...>`. transformers 5 loads that layout too (its own key
conversion), so one directory in that layout serves every loader. `llava_hf_key` is the one place that
renames them.

Parts: `lm.safetensors` (the language model and its head), `tower.safetensors`, `projector.safetensors`,
under a standard `model.safetensors.index.json` (every loader reads a sharded checkpoint) whose metadata
also holds each part's sha256. A stage changes one part at most (alignment: the projector; a new
generation: the tower; SFT of the full LM: the LM), so a part equal to the same part of an LLaVA directory
in `link_from` becomes a hard link to that file: at 7B the 13.5 GB LM is stored once per run instead of
twice per generation (`lvlm/base` and `lvlm/aligned` differ only in the projector). Nothing writes a weight
file in place (a rewrite goes to a new file that then replaces the name), so a link never changes under
another directory; deleting a directory only drops its links. Where linking fails (another filesystem),
the part stays a file of its own.

Light on purpose (safetensors only): the vLLM backend imports it without transformers' model code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable

TOWER, TOWER_NESTED = "vision_tower.", "vision_tower.vision_model."
INDEX_SUFFIX = ".safetensors.index.json"
INDEX = "model" + INDEX_SUFFIX
# (part, a substring of its keys), the first match wins; "" takes the rest (the LM and its head)
PARTS = (("projector", "multi_modal_projector."), ("tower", TOWER), ("lm", ""))
HASH_CHUNK = 1 << 24


def llava_hf_key(key: str) -> str:
    """transformers 5 saved key -> llava-hf layout key (what vLLM loads); other keys unchanged."""
    if key.startswith(TOWER) and not key.startswith(TOWER_NESTED):
        return TOWER_NESTED + key[len(TOWER) :]
    return key


def part_of(key: str) -> str:
    return next(name for name, marker in PARTS if marker in key)


def _save(tensors: dict, path: Path) -> None:
    """safetensors to `path` through a new file: a hard-linked `path` is replaced, never overwritten."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: tensors[k] for k in sorted(tensors)}, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def rewrite_keys(directory: str | Path) -> None:
    """Rename the tower keys of every shard and shard index in `directory` (where needed)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        if any(llava_hf_key(k) != k for k in tensors):
            _save({llava_hf_key(k): v for k, v in tensors.items()}, shard)
    for index in sorted(directory.glob("*" + INDEX_SUFFIX)):
        data = json.loads(index.read_text())
        data["weight_map"] = {llava_hf_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def part_hashes(directory: str | Path) -> dict[str, str]:
    """{part file: sha256} of a directory written by `split_parts`; {} for any other."""
    index = Path(directory) / INDEX
    try:
        return dict(json.loads(index.read_text()).get("metadata", {}).get("part_sha256", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def split_parts(directory: str | Path, link_from: Iterable[str | Path] = ()) -> None:
    """Rewrite the weights `save_pretrained` wrote into `directory` as one file per part (llava-hf keys)
    under one index; a part equal (sha256) to the same part of a directory in `link_from` becomes a hard
    link to it."""
    from safetensors import safe_open

    directory = Path(directory)
    shards = sorted(directory.glob("*.safetensors"))
    where: dict[str, list] = defaultdict(list)  # part -> [(shard, saved key)]
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                where[part_of(llava_hf_key(key))].append((shard, key))
    weight_map, hashes, total = {}, {}, 0
    candidates = [(Path(d), part_hashes(d)) for d in link_from]
    for part, items in sorted(where.items()):
        tensors = {}
        for shard in sorted({s for s, _ in items}):
            with safe_open(str(shard), "pt") as f:
                tensors.update((llava_hf_key(k), f.get_tensor(k)) for s, k in items if s == shard)
        name = f"{part}.safetensors"
        path = directory / f".{name}.new"  # beside the shards until every part is out
        _save(tensors, path)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update((k, name) for k in tensors)
        hashes[name] = file_sha256(path)
        del tensors
        for cand, cand_hashes in candidates:
            if cand_hashes.get(name) == hashes[name] and (cand / name).stat().st_size == path.stat().st_size:
                try:
                    link = directory / f".{name}.link"
                    link.unlink(missing_ok=True)
                    os.link(cand / name, link)
                except OSError:
                    continue  # another filesystem, or no hard links there: keep the file
                os.replace(link, path)
                break
    for shard in shards:
        shard.unlink()
    for index in directory.glob("*" + INDEX_SUFFIX):
        index.unlink()
    for name in hashes:
        os.replace(directory / f".{name}.new", directory / name)
    index = {"metadata": {"total_size": total, "part_sha256": hashes}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2))
