"""Exports of a CLIP checkpoint directory for use outside the project.

- `export_open_clip`: the checkpoint format already is open_clip's local-dir format; this copies the
  config and weights (extras such as the short-tag head only on request) and checks that open_clip
  loads the copy by itself.
- `export_hf_clip`: a transformers `CLIPModel` (safetensors via `save_pretrained`) with a `CLIPProcessor`
  (tokenizer built from open_clip's bundled BPE vocabulary, image processor from the preprocess config).
  The export is reloaded and its embeddings compared with open_clip's before it is put in place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..errors import HQClipError
from ..files import replace_dir
from .convert import openclip_to_hf_clip
from .model import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, read_checkpoint_config
from .saved import load_clip

PROMPTS = ["a photo of a red apple.", "two dogs left of a bicycle", "", "an emoji of a guitar " * 20]
EXPORT_TOLERANCE = 1e-5


class ExportError(HQClipError):
    """An export that does not reproduce the checkpoint's embeddings."""


def export_open_clip(clip_dir: str | Path, out_dir: str | Path, include_extras: bool = False) -> Path:
    """Copy a checkpoint as a plain open_clip directory (`create_model_and_transforms("local-dir:OUT")`)."""
    import open_clip

    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    read_checkpoint_config(clip_dir)
    if not (clip_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"CLIP checkpoint '{clip_dir}' has no {WEIGHTS_FILE}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for f in clip_dir.iterdir():
            if f.is_file() and (f.name in (CONFIG_FILE, WEIGHTS_FILE) or include_extras) and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        open_clip.create_model(f"local-dir:{tmp}", nonscalar_logit_scale=True)  # loads strictly, or raises
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_tokenizer(context_length: int = 77):
    """open_clip's bundled BPE tokenizer as a transformers `CLIPTokenizer` giving the same ids.

    open_clip names its specials `<start_of_text>`/`<end_of_text>`; HF's CLIP tokenizer expects the
    `<|startoftext|>`/`<|endoftext|>` spelling at the same ids. Padding uses id 0, as open_clip does.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = [tuple(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    pad = simple.decoder[0]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=context_length)


def hf_image_processor(preprocess_cfg: dict):
    from transformers import CLIPImageProcessor

    size = preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(preprocess_cfg.get("interpolation", "bicubic"), 3)
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=resample,
        image_mean=list(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        image_std=list(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
    )


def export_hf_clip(
    clip_dir: str | Path, out_dir: str | Path, tolerance: float = EXPORT_TOLERANCE, seed: int = 0
) -> dict:
    """Write a transformers `CLIPModel` + `CLIPProcessor` for a checkpoint; returns the measured differences.

    The text tokenizer and processor are saved only for open_clip's bundled BPE tokenizer (the model
    alone otherwise). Raises `ExportError` if the reloaded export's features differ from open_clip's by
    more than `tolerance` (max abs, unnormalised features; relative to their largest entry when that
    exceeds 1).
    """
    from transformers import CLIPModel, CLIPProcessor

    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    model, _, tokenizer, _ = load_clip(clip_dir)
    config = read_checkpoint_config(clip_dir)
    hf = openclip_to_hf_clip(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf.save_pretrained(tmp)
        bundled_bpe = type(tokenizer).__name__ == "SimpleTokenizer" and not config["model_cfg"]["text_cfg"].get(
            "hf_tokenizer_name"
        )
        if bundled_bpe:
            processor = CLIPProcessor(
                image_processor=hf_image_processor(config.get("preprocess_cfg") or {}),
                tokenizer=hf_tokenizer(int(model.context_length)),
            )
            processor.save_pretrained(tmp)
        reloaded = CLIPModel.from_pretrained(tmp).eval()
        diffs = compare_embeddings(model, reloaded, tokenizer, seed=seed)
        if bundled_bpe:
            diffs["tokenizer_ids_equal"] = _tokenizer_matches(tmp, tokenizer, int(model.context_length))
        # absolute for unit-scale features, relative for large ones (wide towers have big raw features)
        bad = [k for k in ("image", "text") if diffs[k] > tolerance * max(1.0, diffs[f"{k}_max_abs"])]
        if bad or diffs["logit_scale"] > tolerance or diffs.get("tokenizer_ids_equal") is False:
            raise ExportError(f"HF export of '{clip_dir}' differs from open_clip: {diffs}")
        (tmp / "hqclip_export.json").write_text(
            json.dumps(
                {"source": str(clip_dir), "model_name": config.get("model_name"), "max_abs_diff": diffs}, indent=2
            )
        )
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return diffs


@torch.no_grad()
def compare_embeddings(model, hf, tokenizer, n_images: int = 4, seed: int = 0) -> dict:
    """Max abs difference of image and text features (open_clip vs HF) on random images and fixed prompts."""
    gen = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(n_images, 3, size[0], size[1], generator=gen)
    ids = tokenizer(PROMPTS)
    img_oc, txt_oc = model.encode_image(images), model.encode_text(ids)
    img_hf = hf.get_image_features(pixel_values=images).pooler_output
    txt_hf = hf.get_text_features(input_ids=ids).pooler_output
    scale = (model.logit_scale.reshape(()) - hf.logit_scale.reshape(())).abs()
    return {
        "image": float((img_oc - img_hf).abs().max()),
        "text": float((txt_oc - txt_hf).abs().max()),
        "logit_scale": float(scale),
        "image_max_abs": float(img_oc.abs().max()),
        "text_max_abs": float(txt_oc.abs().max()),
    }


def _tokenizer_matches(hf_dir: Path, tokenizer, context_length: int) -> bool:
    from transformers import CLIPTokenizer

    hf_tok = CLIPTokenizer.from_pretrained(hf_dir)
    hf_ids = hf_tok(PROMPTS, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")[
        "input_ids"
    ]
    return bool(torch.equal(hf_ids, tokenizer(PROMPTS)))


def export_clip(
    clip_dir: str | Path, out_dir: str | Path, fmt: str = "hf", include_extras: bool = False
) -> Optional[dict]:
    """The `hqclip export-clip` stage: `fmt` is "hf" (transformers) or "open_clip"."""
    if fmt == "hf":
        return export_hf_clip(clip_dir, out_dir)
    if fmt == "open_clip":
        export_open_clip(clip_dir, out_dir, include_extras=include_extras)
        return None
    raise ValueError(f"export format '{fmt}': expected 'hf' or 'open_clip'")
