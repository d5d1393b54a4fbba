"""How exact the open_clip -> transformers conversion is, per architecture (random weights, CPU).

Prints a markdown table: max abs difference of every vision hidden state (HF `CLIPVisionModel` against
open_clip's block outputs), of image and text features (HF `CLIPModel` against open_clip), and the
time to convert. Usage: python benchmarks/bench_clip_convert.py [ARCH ...] (default: our two and ViT-B-16).
"""

from __future__ import annotations

import sys
import time

import torch

from cycle.clip.convert import openclip_to_hf_clip, openclip_vit_to_hf_vision
from cycle.clip.model import create_clip

PROMPTS = ["a photo of a red apple.", "two dogs left of a bicycle", "", "a guitar " * 60]


@torch.no_grad()
def measure(arch: str, n_images: int = 2) -> dict:
    torch.manual_seed(0)
    model, _, _, tok = create_clip(arch)
    model.eval()
    size = model.visual.image_size
    images = torch.randn(n_images, 3, size[0], size[1])
    start = time.perf_counter()
    vision = openclip_vit_to_hf_vision(model.visual)
    whole = openclip_to_hf_clip(model)
    convert_s = time.perf_counter() - start
    out = vision(pixel_values=images, output_hidden_states=True)
    ref = model.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    blocks = [torch.cat([p, s], 1) for p, s in zip(ref["image_intermediates_prefix"], ref["image_intermediates"])]
    hidden = max(float((out.hidden_states[i + 1] - b).abs().max()) for i, b in enumerate(blocks))
    ids = tok(PROMPTS)
    img = float((whole.get_image_features(pixel_values=images).pooler_output - model.encode_image(images)).abs().max())
    txt = float((whole.get_text_features(input_ids=ids).pooler_output - model.encode_text(ids)).abs().max())
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"arch": arch, "params_M": params, "hidden": hidden, "image": img, "text": txt, "convert_s": convert_s}


def main(archs: list[str]) -> None:
    print(
        "| architecture | params (M) | max diff hidden states | max diff image features | max diff text features "
        "| convert (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for arch in archs:
        r = measure(arch)
        print(
            f"| {r['arch']} | {r['params_M']:.1f} | {r['hidden']:.1e} | {r['image']:.1e} | {r['text']:.1e} | "
            f"{r['convert_s']:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:] or ["hqclip-micro", "hqclip-tiny", "ViT-B-16"])
