"""Teacher seeds from the scene graph, in the four-formula format of the released annotations.

    desc      ["the image shows two dogs on the left and a red apple on the right, on a blue background."]
    neg_desc  ["the image shows two service dogs on the left and a red apple on the right, on a blue background."]
    tags      ["dog", "pet", "red apple", "fruit", "blue background"]
    neg_tags  ["gorilla", "ape", "green apple", "citrus", "red background"]

`desc` is one sentence (short on purpose: a tiny annotator must learn to write the whole JSON).
`neg_desc[i]` is one minimal edit of `desc[i]` (`object`, `relation` or `count`, see `edits`).
`tags`: per object its name and one CLDR keyword (its category, "animal", "vehicle", ..., when it has no
usable keyword), then the background colour: 3 to 7 phrases. `neg_tags[i]` swaps `tags[i]`: a name for
the sibling's name (`object`), a keyword for a keyword of that sibling the object does not have
(`keyword`), the colour for another (`color`); a negative tag is never one of the positive tags. The
edits made are returned beside the formulas and kept in the training row's `meta["seed_edits"]`.
"""

from __future__ import annotations

import random

from .edits import EDITS, apply_edit
from .language import COLORS, describe
from .vocab import Vocab


def _negative_keyword(obj_name: str, sibling: str, vocab: Vocab, taken: set[str], rng: random.Random) -> str:
    own = set(vocab.by_name[obj_name].keywords)
    pools = (
        [k for k in vocab.by_name[sibling].keywords],
        [k for o in vocab if o.subgroup == vocab.by_name[obj_name].subgroup for k in o.keywords],
        [k for o in vocab if o.group == vocab.by_name[obj_name].group for k in o.keywords],
        [k for o in vocab for k in o.keywords],
        vocab.siblings(obj_name),
    )
    for pool in pools:
        options = sorted({k for k in pool if k not in own and k not in taken})
        if options:
            return rng.choice(options)
    return sibling


def seed_annotation(scene: dict, vocab: Vocab, rng: random.Random, max_count: int) -> dict:
    """The four formulas for a scene, plus `edits`: {"neg_desc": [...], "neg_tags": [...]}."""
    kind = rng.choice(EDITS)
    negative, _ = apply_edit(kind, scene, vocab, rng, max_count)
    present = {o["name"] for o in scene["objects"]}
    tags, neg_tags, tag_edits = [], [], []
    pairs = []
    for obj in scene["objects"]:
        sibling_options = [s for s in vocab.siblings(obj["name"]) if s not in present]
        sibling = rng.choice(sibling_options or [n for n in vocab.names if n not in present])
        tags.append(obj["name"])
        pairs.append(("object", sibling))
        own = vocab.by_name[obj["name"]]
        keywords = [k for k in own.keywords if k not in tags] or [c for c in (own.category,) if c not in tags]
        if keywords:
            tags.append(rng.choice(keywords))
            pairs.append(("keyword", (obj["name"], sibling)))
    tags.append(f"{scene['background']} background")
    other = rng.choice([c for c in sorted(COLORS) if c != scene["background"]])
    pairs.append(("color", f"{other} background"))
    positive = set(tags)
    for _tag, (edit, payload) in zip(tags, pairs):
        if edit == "keyword":
            name, sibling = payload
            payload = _negative_keyword(name, sibling, vocab, positive | set(neg_tags), rng)
        neg_tags.append(payload)
        tag_edits.append(edit)
    return {
        "desc": [describe(scene)],
        "neg_desc": [describe(negative)],
        "tags": tags,
        "neg_tags": neg_tags,
        "edits": {"neg_desc": [kind], "neg_tags": tag_edits},
    }
