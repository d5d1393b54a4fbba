"""Tower swap: a LLaVA whose vision tower is CLIP_{g-1}'s open_clip ViT, converted exactly to HF.

`build_lvlm` joins three parts into one `LlavaForConditionalGeneration` directory with its
`LlavaProcessor`: the converted `CLIPVisionModel` (hidden states equal open_clip's), the LM of
`prepare_lm`, and a fresh 2-layer GELU MLP projector. With `keep_cls_token` the image tokens are all the
tower's tokens (feature select "full": CLS + patches), else the patches only ("default").

Saved layout: the llava-hf one (`weights.llava_hf_key`), so one directory serves the transformers backend,
vLLM and older transformers alike, one file per part (`weights.split_parts`: lm, tower, projector; a part
equal to one of an earlier LLaVA directory of the run is a hard link to it):

    language_model.model.*   language_model.lm_head.weight   multi_modal_projector.linear_{1,2}.*
    vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}.*

The processor's chat template renders `cycle.annotate.schema.model_input` exactly, so chat-style
serving (an OpenAI-compatible vLLM server) feeds the model what SFT trained it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

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
from ..device import resolve_device
from ..errors import HQClipError
from .common import LVLMError, finish, seed_everything, staging_dir
from .weights import split_parts

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


def lvlm_dtype(setting: str, device: str | torch.device = "auto") -> torch.dtype:
    """`lvlm.dtype`: "auto" is bf16 on a GPU (a 7B LM in fp32 would need 28 GB for weights alone) and fp32
    on the CPU (bf16 matmuls there are slow and the tiny models are small)."""
    if setting == "bf16":
        return torch.bfloat16
    if setting == "fp32":
        return torch.float32
    kind = device.type if isinstance(device, torch.device) else resolve_device(device).type
    return torch.bfloat16 if kind == "cuda" else torch.float32


def _load_error(what: str, name, err: Exception) -> LVLMError:
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return LVLMError(f"{what} '{name}' does not load offline or from the hub: {first}")


def _with_image_token(lm, tokenizer):
    """Add the `<image>` placeholder (and a pad token) to a tokenizer that lacks them; grow the embeddings."""
    added = 0
    if IMAGE_TOKEN not in tokenizer.get_vocab():  # a hub LM: the placeholder is new to it
        added += tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if added or len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer))
    return lm, tokenizer


def _lm_with_image_token(lm_dir: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig

    what = "config key 'lvlm.lm.name': causal LM"
    try:
        config = AutoConfig.from_pretrained(str(lm_dir))
    except (OSError, ValueError) as err:
        raise _load_error(what, lm_dir, err) from None
    if getattr(config, "vision_config", None) is not None:  # qwen2_vl, llava, ...: not a causal LM
        raise refuse_vlm("lvlm.lm.name", lm_dir, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
        lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=dtype)
    except (OSError, ValueError) as err:
        raise _load_error(what, lm_dir, err) from None
    return _with_image_token(lm, tokenizer)


def refuse_vlm(key: str, name, config) -> LVLMError:
    """An image-text-to-text model that is not a LLaVA (qwen2_vl, ...): its tower cannot be swapped for
    our CLIP's; it can still write annotations as a teacher or annotator from its own server."""
    arch = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    if config.model_type == "llava" and key == "lvlm.lm.name":
        return LVLMError(f"config key 'lvlm.lm.name': '{name}' is a LLaVA: name it with lvlm.base instead")
    return LVLMError(
        f"config key '{key}': '{name}' is a {config.model_type} model ({arch}), not a LLaVA whose vision "
        "tower can be replaced by our CLIP; use it as a teacher or annotator instead: serve it with vLLM "
        "and set annotate.backend=openai (OpenAI-compatible server, annotate.openai.base_url/model) or "
        "annotate.backend=vllm"
    )


@dataclass
class BaseParts:
    """What an existing LLaVA lends the new one: its LM, tokenizer, chat template, maybe its projector."""

    lm: torch.nn.Module  # the decoder (`model.language_model`)
    lm_head: torch.nn.Module
    text_config: object
    tokenizer: object
    chat_template: Optional[str]
    projector: Optional[torch.nn.Module]  # None: its input width is not the tower's
    projector_act: str
    projector_bias: bool
    projector_in: int


def load_base_parts(base: str, tower_width: int, dtype: torch.dtype) -> BaseParts:
    """The parts of the LLaVA `base` (hub name or directory) that a LLaVA on our tower reuses."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise _load_error("config key 'lvlm.base': LLaVA", base, err) from None
    if config.model_type != "llava":
        if getattr(config, "vision_config", None) is not None:
            raise refuse_vlm("lvlm.base", base, config)
        raise LVLMError(
            f"config key 'lvlm.base': '{base}' is a {config.model_type} model without vision: "
            "name a causal LM with lvlm.lm.name instead (and leave lvlm.base empty)"
        )
    try:
        model = LlavaForConditionalGeneration.from_pretrained(base, dtype=dtype)
        processor = AutoProcessor.from_pretrained(base)
    except (OSError, ValueError) as err:
        raise _load_error("config key 'lvlm.base': LLaVA", base, err) from None
    projector = model.model.multi_modal_projector
    width = projector.linear_1.in_features
    _, tokenizer = _with_image_token(model, processor.tokenizer)  # the whole LLaVA: lm_head grows too
    return BaseParts(
        lm=model.model.language_model,
        lm_head=model.lm_head,
        text_config=model.config.text_config,
        tokenizer=tokenizer,
        chat_template=getattr(processor, "chat_template", None),
        projector=projector if width == tower_width else None,
        projector_act=config.projector_hidden_act,
        projector_bias=bool(getattr(config, "multimodal_projector_bias", True)),
        projector_in=width,
    )


def build_lvlm(
    clip_dir: str | Path,
    lm_dir: str | Path,
    cfg: LVLMConfig,
    out_dir: str | Path,
    seed: int = 0,
    device: str = "auto",
    base: Optional[str] = None,
    link_from: Iterable[str | Path] = (),
) -> Path:
    """CLIP_{g-1} (a `save_clip` directory) + LM (`prepare_lm`'s output or an HF name) -> LLaVA directory.

    `base` (a LLaVA directory, e.g. the previous generation's annotator under `lvlm.carry`) takes the
    place of `cfg.base`. With a base (an existing LLaVA) `lm_dir` is not read: the base's LM, tokenizer and
    chat template are used, and its projector when its input width is the tower's (else a fresh one, for alignment).
    Weights are saved in `lvlm.dtype` (bf16 on a GPU by default); a part equal to that of a LLaVA directory in
    `link_from` (the run's earlier ones: the LM of generation 1's is generation 2's) is a hard link to it.
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
    dtype = lvlm_dtype(cfg.dtype, device)
    base_name = base or cfg.base.strip()
    base = load_base_parts(base_name, tower.config.hidden_size, dtype) if base_name else None
    if base is None:
        lm_full, tokenizer = _lm_with_image_token(lm_dir, dtype)
        decoder, lm_head, text_config = lm_full.model, lm_full.lm_head, lm_full.config
        chat_template, act, bias = CHAT_TEMPLATE, "gelu", True
    else:
        decoder, lm_head, text_config, tokenizer = base.lm, base.lm_head, base.text_config, base.tokenizer
        # the base's template (its conversation format) when it has one: SFT renders its inputs with it too
        chat_template, act, bias = base.chat_template or CHAT_TEMPLATE, base.projector_act, base.projector_bias
    strategy = "full" if cfg.keep_cls_token else "default"
    n_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        multimodal_projector_bias=bias,
        image_seq_length=n_patches + (1 if cfg.keep_cls_token else 0),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    seed_everything(seed)
    with torch.device("meta"):  # shell only: every part is replaced by a real module below
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.language_model = decoder
    model.lm_head = lm_head
    reused = base is not None and base.projector is not None
    model.model.multi_modal_projector = base.projector if reused else LlavaMultiModalProjector(config)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"build_lvlm: parameters left uninitialised: {left[:5]}")
    model.to(dtype)
    processor = LlavaProcessor(
        image_processor=image_processor_for(clip.visual),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    info = {"clip": str(clip_dir), "lm": str(base_name or lm_dir), "seed": seed, "dtype": str(dtype)}
    if base is not None:
        info.update(base=base_name, projector="reused" if reused else "fresh", base_projector_in=base.projector_in)
    return save_lvlm(model, processor, out_dir, info, link_from)


def write_lvlm(
    model: LlavaForConditionalGeneration, processor, directory: str | Path, link_from: Iterable[str | Path] = ()
) -> Path:
    """Model + processor into `directory`: llava-hf keys, one file per part, parts equal to those of a
    directory in `link_from` hard-linked (`weights.split_parts`; in place: see `save_lvlm`)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    split_parts(directory, link_from)
    return directory


def save_lvlm(
    model: LlavaForConditionalGeneration,
    processor,
    out_dir: str | Path,
    info: Optional[dict] = None,
    link_from: Iterable[str | Path] = (),
) -> Path:
    """`write_lvlm` into `out_dir` atomically: written aside (with `info.json`), then renamed into place."""
    tmp = staging_dir(out_dir)
    write_lvlm(model, processor, tmp, link_from)
    return finish(tmp, out_dir, info)


class LVLMNotFound(HQClipError, FileNotFoundError):
    """A path given as an LVLM directory holds none (also a FileNotFoundError, as it was)."""


def load_lvlm(lvlm_dir: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(model in eval mode, processor) from a directory written by `save_lvlm`; offline. `dtype` None: fp32
    on the CPU, bf16 on a GPU."""
    lvlm_dir = Path(lvlm_dir)
    if not (lvlm_dir / "config.json").is_file():
        raise LVLMNotFound(f"'{lvlm_dir}' is not an LVLM directory (no config.json); build it first")
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(str(lvlm_dir), dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(lvlm_dir))
    return model, processor
