"""Checkable facts, from a scene graph or read from free text, and how well one set matches another.

A fact is a tuple:

    ("object", name)               the object is in the image
    ("count", name, n)             it appears n times
    ("position", name, word)       it is at left/right/top/bottom/center

`text_facts` reads them from any text in the scene grammar's words (a description, a list of sentences,
tags, alt-text, an annotator's output): object names (singular or plural, longest name first, so
"hot dogs" is not a dog), the count word just before a name (a/an/one .. nine), and the first position
phrase after it, before the next name. Text it cannot read yields no facts, never wrong ones.
This is how annotation quality is measured: `fact_prf(text_facts(annotation), scene_facts(scene))`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional, Union

from .language import COUNT_WORDS, POSITION_PHRASES, plural
from .vocab import Vocab, vocab_names

_COUNT_BEFORE = re.compile(r"\b(a|an|" + "|".join(COUNT_WORDS[1:]) + r")\s+$")
_POSITION = re.compile(r"\b(" + "|".join(POSITION_PHRASES.values()) + r")\b")
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}
_COUNT_VALUE = {"a": 1, "an": 1, **{w: i for i, w in enumerate(COUNT_WORDS)}}


def scene_facts(scene: dict) -> set[tuple]:
    facts: set[tuple] = set()
    for obj in scene["objects"]:
        facts |= {
            ("object", obj["name"]),
            ("count", obj["name"], obj["count"]),
            ("position", obj["name"], obj["position"]),
        }
    return facts


@lru_cache(maxsize=16)
def _matcher(names: tuple[str, ...]) -> tuple[re.Pattern, dict[str, str]]:
    surface = {}
    for name in names:
        surface.setdefault(plural(name), name)
        surface[name] = name
    alternatives = sorted(surface, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(s) for s in alternatives) + r")(?![\w-])")
    return pattern, surface


def text_facts(text: Union[str, Iterable[str], None], vocab: Union[Vocab, Iterable[str]]) -> set[tuple]:
    """Facts stated by `text` (a string or a list of strings, read one by one) about `vocab`'s objects."""
    if text is None:
        return set()
    if not isinstance(text, str):
        names = tuple(vocab_names(vocab))
        return set().union(*(text_facts(t, names) for t in text)) if text else set()
    pattern, surface = _matcher(tuple(vocab_names(vocab)))
    lowered = text.lower()
    mentions = [(m.start(), m.end(), surface[m.group(1)]) for m in pattern.finditer(lowered)]
    facts: set[tuple] = set()
    for i, (start, end, name) in enumerate(mentions):
        facts.add(("object", name))
        before = lowered[mentions[i - 1][1] if i else 0 : start]
        count = _COUNT_BEFORE.search(before)
        if count:
            facts.add(("count", name, _COUNT_VALUE[count.group(1)]))
        after = lowered[end : mentions[i + 1][0] if i + 1 < len(mentions) else len(lowered)]
        position = _POSITION.search(after)
        if position:
            facts.add(("position", name, _PHRASE_TO_POSITION[position.group(1)]))
    return facts


def fact_prf(pred: set, true: set, kind: Optional[str] = None) -> dict[str, float]:
    """Precision, recall and F1 of predicted facts against true ones; `kind` keeps one fact kind.

    An empty prediction has precision 0 (it states nothing right); both empty counts as perfect.
    """
    if kind is not None:
        pred = {f for f in pred if f[0] == kind}
        true = {f for f in true if f[0] == kind}
    if not pred and not true:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    hit = len(pred & true)
    precision = hit / len(pred) if pred else 0.0
    recall = hit / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
