"""The saved LLaVA's weight-key layout: the one place that renames vision-tower keys.

transformers 5 saves the tower as `vision_tower.<...>`; vLLM's LLaVA (and transformers 4) load the
llava-hf layout `vision_tower.vision_model.<...>`. transformers 5 loads that layout too (its own key
conversion), so one directory in that layout serves every loader. Light on purpose (safetensors only):
the vLLM backend imports it without transformers' model code.
"""

from __future__ import annotations

import json
from pathlib import Path

TOWER, TOWER_NESTED = "vision_tower.", "vision_tower.vision_model."
INDEX_SUFFIX = ".safetensors.index.json"


def llava_hf_key(key: str) -> str:
    """transformers 5 saved key -> llava-hf layout key (what vLLM loads); other keys unchanged."""
    if key.startswith(TOWER) and not key.startswith(TOWER_NESTED):
        return TOWER_NESTED + key[len(TOWER) :]
    return key


def rewrite_keys(directory: str | Path) -> None:
    """Rename the tower keys of every shard and shard index in `directory` in place (where needed)."""
    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        if any(llava_hf_key(k) != k for k in tensors):
            save_file({llava_hf_key(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    for index in sorted(directory.glob("*" + INDEX_SUFFIX)):
        data = json.loads(index.read_text())
        data["weight_map"] = {llava_hf_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
