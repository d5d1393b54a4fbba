"""Tower swap: a LLaVA whose vision tower is CLIP_{g-1}'s open_clip ViT, converted exactly to HF.

`build_lvlm` joins three parts into one `LlavaForConditionalGeneration` directory with its
`LlavaProcessor`: the converted `CLIPVisionModel` (hidden states equal open_clip's), the LM of
`prepare_lm`, and a fresh 2-layer GELU MLP projector. With `keep_cls_token` the image tokens are all the
tower's tokens (feature select "full": CLS + patches), else the patches only ("default").

Saved layout. transformers 5 writes the tower's weights as `vision_tower.<...>`; vLLM's LLaVA (and
transformers 4) load `vision_tower.vision_model.<...>`, the llava-hf layout. `save_lvlm` rewrites the
saved keys into that layout (transformers 5 loads it too, through its own key conversion), so one
directory serves the transformers backend, vLLM and older transformers alike:

    language_model.model.*   language_model.lm_head.weight   multi_modal_projector.linear_{1,2}.*
    vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}.*

The processor's chat template renders `cycle.annotate.schema.model_input` exactly, so chat-style
serving (an OpenAI-compatible vLLM server) feeds the model what SFT trained it on.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..annotate.schema import IMAGE_TOKEN
from ..config import LVLMConfig, fingerprint
from .common import FINGERPRINT_FILE, cached, finish, seed_everything, staging_dir

# Renders `schema.model_input(prompt)` = "<image>\n{prompt}\nanswer:" from chat messages.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}" + IMAGE_TOKEN + "{{ '\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ '\\nanswer:' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nanswer:' }}{%- endif -%}"
)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def dir_identity(path: str | Path) -> str:
    """What a directory holds, for fingerprints: its recorded fingerprint, else a digest of its weights."""
    path = Path(path)
    fp_file = path / FINGERPRINT_FILE
    if fp_file.is_file():
        return json.loads(fp_file.read_text())["fingerprint"]
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return "|".join(f"{w.name}:{file_digest(w)}" for w in weights) or str(path)


def image_processor_for(visual) -> CLIPImageProcessor:
    """The CLIP's own eval preprocessing (open_clip: resize shortest side, centre crop, normalise)."""
    pre = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=list(pre.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(pre.get("std", (0.26862954, 0.26130258, 0.27577711))),
        resample=3 if pre.get("interpolation", "bicubic") == "bicubic" else 2)  # PIL BICUBIC / BILINEAR


def _lm_with_image_token(lm_dir: str | Path):
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    added = 0
    if IMAGE_TOKEN not in tokenizer.get_vocab():  # a hub LM: the placeholder is new to it
        added += tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if added or len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    return lm, tokenizer


def build_lvlm(clip_dir: str | Path, lm_dir: str | Path, cfg: LVLMConfig, out_dir: str | Path,
               seed: int = 0) -> Path:
    """CLIP_{g-1} (a `save_clip` directory) + LM (`prepare_lm`'s output or an HF name) -> LLaVA directory.

    Cached: the same CLIP weights, LM, config and seed return the existing `out_dir` at once.
    """
    from ..clip.convert import openclip_vit_to_hf_vision
    from ..clip.model import load_clip

    fp = fingerprint({"clip": dir_identity(clip_dir), "lm": dir_identity(lm_dir),
                      "vision_feature_layer": cfg.vision_feature_layer, "keep_cls_token": cfg.keep_cls_token,
                      "seed": seed})
    if cached(out_dir, fp):
        return Path(out_dir)
    clip, _, _, _ = load_clip(clip_dir)
    tower = openclip_vit_to_hf_vision(clip.visual)
    n_layers = tower.config.num_hidden_layers
    if not -(n_layers + 1) <= cfg.vision_feature_layer <= n_layers:
        raise ValueError(f"config key 'lvlm.vision_feature_layer': {cfg.vision_feature_layer} is outside the "
                         f"tower's hidden states (-{n_layers + 1}..{n_layers})")
    lm, tokenizer = _lm_with_image_token(lm_dir)
    strategy = "full" if cfg.keep_cls_token else "default"
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=tower.config, text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=n_patches + (1 if cfg.keep_cls_token else 0),
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    seed_everything(seed)
    with torch.device("meta"):  # shell only: every part is replaced by a real module below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"build_lvlm: parameters left uninitialised: {left[:5]}")
    processor = LlavaProcessor(
        image_processor=image_processor_for(clip.visual), tokenizer=tokenizer,
        patch_size=tower.config.patch_size, vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return save_lvlm(model, processor, out_dir, fp, {"clip": str(clip_dir), "lm": str(lm_dir)})


def vllm_key(key: str) -> str:
    """transformers 5 saved key -> llava-hf layout key (what vLLM loads)."""
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def _rewrite_keys(directory: Path) -> None:
    for shard in sorted(directory.glob("*.safetensors")):
        tensors = load_file(shard)
        if any(vllm_key(k) != k for k in tensors):
            save_file({vllm_key(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {vllm_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def write_lvlm(model: LlavaForConditionalGeneration, processor, directory: str | Path) -> Path:
    """Model + processor into `directory`, keys in the llava-hf layout (no fingerprint: see `save_lvlm`)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    _rewrite_keys(directory)
    return directory


def save_lvlm(model: LlavaForConditionalGeneration, processor, out_dir: str | Path, fp: str,
              info: Optional[dict] = None) -> Path:
    """`write_lvlm` into `out_dir` atomically: written aside, fingerprint last, then renamed into place."""
    tmp = staging_dir(out_dir)
    write_lvlm(model, processor, tmp)
    return finish(tmp, out_dir, fp, info)


def load_lvlm(lvlm_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, processor) from a directory written by `save_lvlm`; offline."""
    lvlm_dir = Path(lvlm_dir)
    if not (lvlm_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{lvlm_dir}' is not an LVLM directory (no config.json); build it first")
    model = LlavaForConditionalGeneration.from_pretrained(str(lvlm_dir), dtype=torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(lvlm_dir))
    return model, processor
