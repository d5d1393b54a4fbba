"""Web-like alt-text: seeded corruption of the clean description.

Each scene draws exactly one kind, with the probabilities of `AltNoiseConfig` (the rest of the mass is
`none`: the alt-text is the clean description). Kinds, in the order they are drawn:

- `one_object`: only one of the scene's objects is named, with its count, nothing else ("two dogs").
- `wrong_count`: the clean description with one object's count changed.
- `wrong_position`: the clean description with one object's position word changed.
- `sibling_name`: the clean description with one object named as a sibling from its subgroup.
- `generic`: text that names nothing ("image", "stock photo", "my new wallpaper").
- `filename`: a file-name-like string that names nothing ("IMG_2041.png", "emoji-sticker-12.jpg").
- `shop_spam`: a shop listing that names one of the objects, title-cased
  ("Cute Red Apple Sticker Pack | Best Price Online").

The kind drawn is kept in `samples.meta["alt_noise"]`. Generic, file-name and spam templates are checked
(by the tests) never to contain an object name by accident.
"""

from __future__ import annotations

import random

from cycle.config import AltNoiseConfig

from .edits import change_count, move_object, swap_object
from .language import count_phrase, describe
from .vocab import Vocab

KINDS = ("one_object", "wrong_count", "wrong_position", "sibling_name", "generic", "filename", "shop_spam")

GENERIC = (
    "image",
    "picture",
    "photo",
    "untitled",
    "clip art",
    "stock photo",
    "my new wallpaper",
    "cute stuff",
    "sticker",
    "look at this",
    "collection",
    "artwork",
)
FILENAME = (
    "IMG_{n4}.png",
    "DSC{n5}.JPG",
    "emoji-sticker-{n2}.jpg",
    "image ({n2}).png",
    "screenshot_2021-{n2}-{n2}.png",
    "download ({n2}).webp",
    "photo_{n4}_{n4}.jpeg",
    "sticker{n2}.gif",
)
SHOP_SPAM = (
    "Buy {Name} Emoji Sticker - Free Shipping!",
    "Cute {Name} Sticker Pack | Best Price Online",
    "{Name} Vinyl Decal SALE",
    "HOT DEAL: {Name} Emoji Print, Order Now",
    "{Name} Sticker Wholesale Cheap",
    "Funny {Name} Emoji T Shirt Design - Shop Now",
)


def draw_kind(rates: AltNoiseConfig, rng: random.Random) -> str:
    u, edge = rng.random(), 0.0
    for kind in KINDS:
        edge += getattr(rates, kind)
        if u < edge:
            return kind
    return "none"


def _filename(rng: random.Random) -> str:
    template = rng.choice(FILENAME)
    while "{n" in template:
        template = (
            template.replace("{n4}", f"{rng.randint(0, 9999):04d}", 1)
            .replace("{n5}", f"{rng.randint(0, 99999):05d}", 1)
            .replace("{n2}", f"{rng.randint(1, 28):02d}", 1)
        )
    return template


def alt_text_of(kind: str, scene: dict, vocab: Vocab, rng: random.Random, max_count: int) -> str:
    """The alt-text of one `kind` (see the module doc) for a scene."""
    if kind == "none":
        return describe(scene)
    if kind == "one_object":
        obj = rng.choice(scene["objects"])
        return count_phrase(obj["name"], obj["count"])
    if kind == "wrong_count":
        return describe(change_count(scene, rng, max_count)[0])
    if kind == "wrong_position":
        return describe(move_object(scene, rng)[0])
    if kind == "sibling_name":
        return describe(swap_object(scene, vocab, rng)[0])
    if kind == "generic":
        return rng.choice(GENERIC)
    if kind == "filename":
        return _filename(rng)
    if kind == "shop_spam":
        name = rng.choice(scene["objects"])["name"]
        return rng.choice(SHOP_SPAM).format(Name=name.title())
    raise ValueError(f"unknown alt-text noise {kind!r}, expected one of none, {', '.join(KINDS)}")


def corrupt(scene: dict, vocab: Vocab, rates: AltNoiseConfig, rng: random.Random, max_count: int) -> tuple[str, str]:
    """(alt-text, kind) for a scene: one kind drawn with the configured rates, then applied."""
    kind = draw_kind(rates, rng)
    return alt_text_of(kind, scene, vocab, rng, max_count), kind
