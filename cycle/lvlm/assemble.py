"""Tower swap: a LLaVA whose vision tower is CLIP_{g-1}'s open_clip ViT, converted exactly to HF.

`build_lvlm` joins three parts into one `LlavaForConditionalGeneration` directory with its
`LlavaProcessor`: the converted `CLIPVisionModel` (hidden states equal open_clip's), the LM of
`prepare_lm`, and a fresh 2-layer GELU MLP projector. With `keep_cls_token` the image tokens are all the
tower's tokens (feature select "full": CLS + patches), else the patches only ("default").

Saved layout: the llava-hf one (`keys.rewrite_keys`), so one directory serves the transformers backend,
vLLM and older transformers alike:

    language_model.model.*   language_model.lm_head.weight   multi_modal_projector.linear_{1,2}.*
    vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}.*

The processor's chat template renders `cycle.annotate.schema.model_input` exactly, so chat-style
serving (an OpenAI-compatible vLLM server) feeds the model what SFT trained it on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from ..annotate.schema import IMAGE_TOKEN
from ..config import LVLMConfig
from ..errors import HQClipError
from .common import LVLMError, finish, seed_everything, staging_dir
from .keys import rewrite_keys

# open_clip's OpenAI-CLIP defaults, for a tower whose preprocess config does not say
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC, PIL_BILINEAR = 3, 2  # CLIPImageProcessor's `resample` takes PIL's numeric codes

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


def image_processor_for(visual) -> CLIPImageProcessor:
    """The CLIP's own eval preprocessing (open_clip: resize shortest side, centre crop, normalise)."""
    pre = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(pre.get("mean", CLIP_MEAN)),
        image_std=list(pre.get("std", CLIP_STD)),
        resample=PIL_BICUBIC if pre.get("interpolation", "bicubic") == "bicubic" else PIL_BILINEAR,
    )


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


def build_lvlm(clip_dir: str | Path, lm_dir: str | Path, cfg: LVLMConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """CLIP_{g-1} (a `save_clip` directory) + LM (`prepare_lm`'s output or an HF name) -> LLaVA directory.

    Always builds (the controller decides reuse); `out_dir` appears whole or not at all.
    """
    from ..clip.convert import openclip_vit_to_hf_vision
    from ..clip.saved import load_clip

    clip, _, _, _ = load_clip(clip_dir)
    tower = openclip_vit_to_hf_vision(clip.visual)
    n_layers = tower.config.num_hidden_layers
    if not -(n_layers + 1) <= cfg.vision_feature_layer <= n_layers:
        raise LVLMError(
            f"config key 'lvlm.vision_feature_layer': {cfg.vision_feature_layer} is outside the "
            f"tower's hidden states (-{n_layers + 1}..{n_layers})"
        )
    lm, tokenizer = _lm_with_image_token(lm_dir)
    strategy = "full" if cfg.keep_cls_token else "default"
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=lm.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=n_patches + (1 if cfg.keep_cls_token else 0),
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
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
        image_processor=image_processor_for(clip.visual),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return save_lvlm(model, processor, out_dir, {"clip": str(clip_dir), "lm": str(lm_dir), "seed": seed})


def write_lvlm(model: LlavaForConditionalGeneration, processor, directory: str | Path) -> Path:
    """Model + processor into `directory`, keys in the llava-hf layout (in place: see `save_lvlm`)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    rewrite_keys(directory)
    return directory


def save_lvlm(
    model: LlavaForConditionalGeneration, processor, out_dir: str | Path, info: Optional[dict] = None
) -> Path:
    """`write_lvlm` into `out_dir` atomically: written aside (with `info.json`), then renamed into place."""
    tmp = staging_dir(out_dir)
    write_lvlm(model, processor, tmp)
    return finish(tmp, out_dir, info)


class LVLMNotFound(HQClipError, FileNotFoundError):
    """A path given as an LVLM directory holds none (also a FileNotFoundError, as it was)."""


def load_lvlm(lvlm_dir: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, processor) from a directory written by `save_lvlm`; offline."""
    lvlm_dir = Path(lvlm_dir)
    if not (lvlm_dir / "config.json").is_file():
        raise LVLMNotFound(f"'{lvlm_dir}' is not an LVLM directory (no config.json); build it first")
    model = LlavaForConditionalGeneration.from_pretrained(str(lvlm_dir), dtype=torch.float32).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(lvlm_dir))
    return model, processor
