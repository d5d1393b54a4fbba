"""Builders shared by the annotation tests (no tests here): a tiny random LLaVA and a small store.

The random LLaVA writes garbage, which is what the failure paths need; it is a real
`LlavaForConditionalGeneration` with a real processor, saved and loaded like the annotator of a run.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image

WORDS = ["apple", "cup", "red", "blue", "two", "left", "right", "cat", "dog", "the", "image", "shows"]


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def sample_rows(n: int, split: str = "train", seed: int = 0, prefix: str = "s") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        data = png((rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        rows.append(
            {
                "id": f"{prefix}{i:05d}",
                "image": data,
                "alt_text": " ".join(rng.sample(WORDS, 3)),
                "source": "test",
                "split": split,
                "width": 32,
                "height": 32,
                "sha256": "",
                "meta": None,
            }
        )
    return rows


def make_store(path: Path, n_train: int = 24, n_val: int = 4):
    from cycle.store import Store

    store = Store(path)
    store.append("samples", sample_rows(n_train) + sample_rows(n_val, split="val", prefix="v"))
    return store


def build_random_llava(
    out_dir: Path, hidden: int = 32, layers: int = 1, image_size: int = 32, patch: int = 8, seed: int = 0
) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama LM) with its processor, saved to `out_dir`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from cycle.annotate.schema import IMAGE_TOKEN, build_prompt, model_input, to_target_json
    from cycle.lvlm.tokenizer import train_tokenizer

    texts = [
        model_input(build_prompt(" ".join(WORDS[i : i + 3])))
        + to_target_json(
            {
                "desc": [f"the image shows {w}."],
                "neg_desc": ["the image shows a dog."],
                "tags": [w],
                "neg_tags": ["dog"],
            }
        )
        for i, w in enumerate(WORDS)
    ] * 4
    tok = train_tokenizer(texts, vocab_size=400, min_frequency=1)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
