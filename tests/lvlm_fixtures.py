"""Small, fast inputs for the LVLM tests: a synthetic shapes store, a micro CLIP, a tiny LM config."""

from __future__ import annotations

import hashlib
import io
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square")
PLACES = {"left": 4, "right": 18}
SWAP = {
    "red": "blue",
    "blue": "red",
    "green": "yellow",
    "yellow": "green",
    "circle": "square",
    "square": "circle",
    "left": "right",
    "right": "left",
}


def shape_png(color: str, shape: str, place: str) -> bytes:
    img = Image.new("RGB", (32, 32), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    x = PLACES[place]
    box = (x, 10, x + 10, 20)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def shapes_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """`n` samples rows and a seed (teacher) record for each: one coloured shape on the left or right."""
    rng = random.Random(seed)
    samples, seeds = [], []
    for i in range(n):
        color, shape, place = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(PLACES))
        png = shape_png(color, shape, place)
        alt = rng.choice([f"{color} {shape}", f"a {shape}", f"IMG_{i:04d}.png", f"{SWAP[color]} {shape} sale"])
        sid = f"shape-{i:03d}"
        samples.append(
            {
                "id": sid,
                "image": png,
                "alt_text": alt,
                "source": "test-shapes",
                "split": "train",
                "width": 32,
                "height": 32,
                "sha256": hashlib.sha256(png).hexdigest(),
                "meta": None,
            }
        )
        desc = f"the image shows a {color} {shape} on the {place}."
        seeds.append(
            {
                "id": sid,
                "desc": [desc],
                "neg_desc": [desc.replace(place, SWAP[place])],
                "tags": [f"{color} {shape}", place],
                "neg_tags": [f"{SWAP[color]} {shape}", SWAP[place]],
                "origin": "test-shapes",
            }
        )
    return samples, seeds
