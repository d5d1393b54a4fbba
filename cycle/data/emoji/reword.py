"""Other wordings of a held-out caption: the scene's facts in sentences that neither the teacher template
(`language.describe`) nor the alt-text noise (`altnoise`) uses (issue #10, point 5).

The val/test captions are `describe(scene)`, the sentence the teacher seeds teach the annotator to write,
so part of a later generation's held-out gain could be format matching rather than more correct facts.
The held-out rows of test_retrieval, test_negatives and test_compositional therefore also carry
`meta["reworded"]`: the same facts (objects, counts, positions, background) said another way, which the
evaluation reports as `<split>_reworded/<metric>` beside `<split>/<metric>`.

A wording is a `Style`, drawn per row from the row's own stream: a template (word order, punctuation),
one set of position phrases, counts as words or numerals, and per object slot whether a CLDR keyword that
only that object has stands in for its name ("a tortoise emoji"). Templates, two objects:

    pos_first   on the left, two dogs; at the top, a cat; blue backdrop.
    colons      blue backdrop. to the left: 2 dogs. up top: 1 cat.
    holding     a blue backdrop holding two dogs on the left side, plus one cat near the top.
    placed      two dogs, placed on the left, and a cat, placed at the top; the backdrop is blue.
    tally       left - 2x dog | top - 1x cat | backdrop: blue

None says "the image shows" or "background". Rendering is a pure function of (style, scene graph), so a
minimal edit of the graph said in the positive's style is the same edit, in the same place, of the
reworded positive.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache

from .altnoise import GENERIC, SHOP_SPAM
from .language import COLORS, COUNT_WORDS, POSITIONS, article, plural
from .vocab import candidates

TEMPLATES = ("pos_first", "colons", "holding", "placed", "tally")
POSITION_VARIANTS = (
    {
        "left": "on the left",
        "right": "on the right",
        "top": "at the top",
        "bottom": "at the bottom",
        "center": "in the center",
    },
    {
        "left": "to the left",
        "right": "to the right",
        "top": "up top",
        "bottom": "down below",
        "center": "in the middle",
    },
    {
        "left": "on the left side",
        "right": "on the right side",
        "top": "near the top",
        "bottom": "near the bottom",
        "center": "at the center",
    },
)
MAX_REWORDINGS = 3  # reworded captions per retrieval image: 1..3, drawn per row
SYNONYM_SHARE = 0.5  # chance that an object slot says a keyword instead of the name (where one exists)
# Words of the templates and phrases above (a keyword containing one could be misread as structure) and of
# the generic and shop alt-text (a keyword must not make a caption look like that noise).
_RESERVED = {
    *(w for g in GENERIC for w in g.split()),
    *(w for t in SHOP_SPAM for w in re.findall(r"[a-z]+", t.replace("{Name}", "").lower())),
    *COLORS,
    *COUNT_WORDS,
    *POSITIONS,
    *(w for variant in POSITION_VARIANTS for phrase in variant.values() for w in phrase.split()),
    *(w for t in TEMPLATES for w in t.split("_")),
    "a",
    "an",
    "and",
    "plus",
    "backdrop",
    "background",
    "image",
    "emoji",
    "shows",
}


@dataclass(frozen=True)
class Style:
    template: str
    positions: int  # index into POSITION_VARIANTS (the tally template uses bare position words)
    numerals: bool  # "2 dogs" rather than "two dogs" (the tally template always counts "2x")
    one: str  # a count of one in words: "a" (a/an) or "one"
    synonym: tuple[bool, ...]  # per object slot: say a keyword instead of the name, where it has one
    pick: tuple[int, ...]  # per object slot: which of its keywords (modulo their number)


@lru_cache(maxsize=1)
def _synonym_table() -> dict[str, tuple[str, ...]]:
    """Object name -> its CLDR keywords that no other candidate object has (so the keyword still names this
    one object, whatever the vocabulary size) and that use no word of the templates."""
    shared = Counter(k for o in candidates() for k in o.keywords)
    return {
        o.name: tuple(k for k in o.keywords if shared[k] == 1 and not set(re.split(r"[\s-]", k)) & _RESERVED)
        for o in candidates()
    }


def synonyms(name: str) -> tuple[str, ...]:
    return _synonym_table().get(name, ())


def draw_styles(n_objects: int, rng: random.Random, n: int) -> list[Style]:
    """`n` styles with distinct templates for a scene of `n_objects` objects."""
    out = []
    for template in rng.sample(TEMPLATES, n):
        out.append(
            Style(
                template=template,
                positions=rng.randrange(len(POSITION_VARIANTS)),
                numerals=rng.random() < 0.5,
                one=rng.choice(("a", "one")),
                synonym=tuple(rng.random() < SYNONYM_SHARE for _ in range(n_objects)),
                pick=tuple(rng.randrange(1000) for _ in range(n_objects)),
            )
        )
    return out


def _noun(style: Style, slot: int, obj: dict, singular: bool = False) -> str:
    options = synonyms(obj["name"])
    if style.synonym[slot] and options:
        return f"{options[style.pick[slot] % len(options)]} emoji"  # "emoji" reads the same in the plural
    return obj["name"] if singular or obj["count"] == 1 else plural(obj["name"])


def _count(style: Style, noun: str, n: int) -> str:
    if style.numerals:
        return str(n)
    if n == 1:
        return article(noun) if style.one == "a" else "one"
    return COUNT_WORDS[n]


def render(style: Style, scene: dict) -> str:
    """The scene said in `style` (see the module doc for the templates)."""
    bg, where = scene["background"], POSITION_VARIANTS[style.positions]
    if style.template == "tally":
        items = [
            f"{o['position']} - {o['count']}x {_noun(style, i, o, singular=True)}"
            for i, o in enumerate(scene["objects"])
        ]
        return " | ".join(items) + f" | backdrop: {bg}"
    parts = []
    for i, obj in enumerate(scene["objects"]):
        noun = _noun(style, i, obj)
        parts.append((f"{_count(style, noun, obj['count'])} {noun}", where[obj["position"]]))
    if style.template == "pos_first":
        return "; ".join(f"{pos}, {np}" for np, pos in parts) + f"; {bg} backdrop."
    if style.template == "colons":
        return f"{bg} backdrop. " + " ".join(f"{pos}: {np}." for np, pos in parts)
    if style.template == "holding":
        return f"{article(bg)} {bg} backdrop holding " + ", plus ".join(f"{np} {pos}" for np, pos in parts) + "."
    if style.template == "placed":
        return ", and ".join(f"{np}, placed {pos}" for np, pos in parts) + f"; the backdrop is {bg}."
    raise ValueError(f"unknown template {style.template!r}, expected one of {', '.join(TEMPLATES)}")


def reworded_captions(scene: dict, rng: random.Random) -> dict:
    """`meta["reworded"]` of a retrieval row: 1..MAX_REWORDINGS captions, each in its own template."""
    styles = draw_styles(len(scene["objects"]), rng, rng.randint(1, MAX_REWORDINGS))
    return {"captions": [render(s, scene) for s in styles], "styles": [asdict(s) for s in styles]}


def reworded_negatives(scene: dict, edited: list[tuple[str, dict]], rng: random.Random) -> dict:
    """`meta["reworded"]` of a negatives row: the positive and each (edit, edited scene) in one style (one
    positive per image is what the negatives metric compares)."""
    (style,) = draw_styles(len(scene["objects"]), rng, 1)
    return {
        "positive": render(style, scene),
        "negatives": [{"text": render(style, s), "edit": kind} for kind, s in edited],
        "styles": [asdict(style)],
    }
