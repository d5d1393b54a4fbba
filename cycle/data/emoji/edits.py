"""Minimal edits of a scene graph; said with `describe`, they give aligned negative sentences.

- `object`: one object becomes a sibling (same subgroup) that is not in the scene.
- `relation`: two objects swap places; a lone object moves to another position.
- `count`: one object's count changes.

Each edit keeps everything else, including the order of objects, so the edited sentence differs from the
original only in the edited words. Boxes are left as they were: an edited graph is text, not an image.
"""

from __future__ import annotations

import copy
import random

from .language import POSITIONS
from .vocab import Vocab

EDITS = ("object", "relation", "count")


def _names(scene: dict) -> set[str]:
    return {o["name"] for o in scene["objects"]}


def swap_object(scene: dict, vocab: Vocab, rng: random.Random) -> tuple[dict, dict]:
    """Returns (edited scene, {"from": name, "to": sibling})."""
    out = copy.deepcopy(scene)
    obj = rng.choice(out["objects"])
    present = _names(scene)
    options = [s for s in vocab.siblings(obj["name"]) if s not in present]
    if not options:  # every sibling is already in the scene: any absent object will do
        options = [n for n in vocab.names if n not in present]
    new = rng.choice(options)
    info = {"from": obj["name"], "to": new}
    target = vocab.by_name[new]
    obj.update(name=new, emoji=target.emoji, subgroup=target.subgroup)
    return out, info


def swap_relation(scene: dict, rng: random.Random) -> tuple[dict, dict]:
    out = copy.deepcopy(scene)
    objects = out["objects"]
    if len(objects) >= 2:
        a, b = rng.sample(range(len(objects)), 2)
        objects[a]["position"], objects[b]["position"] = objects[b]["position"], objects[a]["position"]
        return out, {"swapped": [objects[a]["name"], objects[b]["name"]]}
    old = objects[0]["position"]
    objects[0]["position"] = rng.choice([p for p in POSITIONS if p != old])
    return out, {"moved": objects[0]["name"], "from": old, "to": objects[0]["position"]}


def move_object(scene: dict, rng: random.Random) -> tuple[dict, dict]:
    """One object gets another position word (may collide with another object's: alt-text noise)."""
    out = copy.deepcopy(scene)
    obj = rng.choice(out["objects"])
    old = obj["position"]
    obj["position"] = rng.choice([p for p in POSITIONS if p != old])
    return out, {"moved": obj["name"], "from": old, "to": obj["position"]}


def change_count(scene: dict, rng: random.Random, max_count: int) -> tuple[dict, dict]:
    out = copy.deepcopy(scene)
    obj = rng.choice(out["objects"])
    old = obj["count"]
    obj["count"] = rng.choice([c for c in range(1, max(max_count, 2) + 1) if c != old])
    return out, {"object": obj["name"], "from": old, "to": obj["count"]}


def apply_edit(kind: str, scene: dict, vocab: Vocab, rng: random.Random, max_count: int) -> tuple[dict, dict]:
    if kind == "object":
        return swap_object(scene, vocab, rng)
    if kind == "relation":
        return swap_relation(scene, rng)
    if kind == "count":
        return change_count(scene, rng, max_count)
    raise ValueError(f"unknown edit {kind!r}, expected one of {', '.join(EDITS)}")
