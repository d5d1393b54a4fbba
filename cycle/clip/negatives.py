"""Minimal-edit negatives: what counts as one (word edit distance), the rule edits that repair a
description negative the annotator did not edit (`loss.neg_repair`), and the one-word neighbours among the
training descriptions that mined negatives are drawn from (`loss.hni_negatives: mined`).

Generic English throughout, never the emoji scenes' vocabulary or scene graph: it runs on user data.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

EDGE_PUNCT = " \t\n.,;:!?\"'`()[]{}"
EDIT_CACHE_SIZE = 200_000  # (positive, negative) part pairs: the same ones come back every epoch


@lru_cache(maxsize=EDIT_CACHE_SIZE)  # mined negatives compare a row's sentences with their neighbours every step
def words_of(text: str) -> tuple[str, ...]:
    """A text's lower-case words, punctuation dropped: what edit distances and neighbours compare."""
    return tuple(re.findall(r"[\w']+", text.lower()))


@lru_cache(maxsize=EDIT_CACHE_SIZE)
def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the word sequences of `a` and `b` (case and punctuation ignored)."""
    x, y = words_of(a), words_of(b)
    prev = list(range(len(y) + 1))
    for i, wx in enumerate(x, 1):
        cur = [i]
        for j, wy in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wx != wy)))
        prev = cur
    return prev[-1]


def negative_part_kind(pos: str, neg: str, max_edit_words: int) -> str:
    """ "edit" (a usable minimal edit), "same" (reads like the positive) or "far" (beyond the bound)."""
    d = word_edit_distance(pos, neg)
    if d == 0:
        return "same"
    return "far" if max_edit_words and d > max_edit_words else "edit"


# Closed word classes whose members swap for one another without changing the grammar: generic English,
# not the emoji scenes' vocabulary (counts from two on keep the plural; spatial words swap with their opposite).
SWAP_CLASSES = (
    ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    ("left", "right"),
    ("top", "bottom"),
    ("above", "below"),
    ("front", "behind"),
    ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "grey"),
)
_SWAP_OF = {w: cls for cls in SWAP_CLASSES for w in cls}


def swap_edit(sentence: str, rng) -> str:
    """A one-word minimal edit of `sentence`: one count, spatial or colour word swapped for another of its
    class (`SWAP_CLASSES`), case and punctuation kept; "" when it has none. Works on any English text."""
    tokens = sentence.split(" ")
    spots = [i for i, t in enumerate(tokens) if t.strip(EDGE_PUNCT).lower() in _SWAP_OF]
    if not spots:
        return ""
    i = spots[int(rng.integers(len(spots)))]
    core = tokens[i].strip(EDGE_PUNCT)
    others = [w for w in _SWAP_OF[core.lower()] if w != core.lower()]
    new = others[int(rng.integers(len(others)))]
    new = new.capitalize() if core[:1].isupper() else new
    start = tokens[i].index(core)
    tokens[i] = tokens[i][:start] + new + tokens[i][start + len(core) :]
    return " ".join(tokens)


@lru_cache(maxsize=EDIT_CACHE_SIZE)  # a run's tags repeat every epoch (re's own cache holds 512 patterns)
def _name_pattern(name: str) -> re.Pattern:
    """`name` as whole words, any case and spacing, a plural ending allowed on its last word."""
    words = [re.escape(w) for w in name.split()]
    return re.compile(r"\b" + r"\s+".join(words) + r"(?P<plural>e?s)?\b", re.IGNORECASE)


def _plural(name: str) -> str:
    return name + ("es" if re.search(r"(s|x|z|ch|sh)$", name) else "s")


def tag_edit(sentence: str, tags: Sequence[str], neg_tags: Sequence[str], rng) -> str:
    """An object edit of `sentence` made from the annotator's own aligned tag negatives: one tag the sentence
    names (whole words; "two dogs" names "dog") replaced by its negative tag ("two cats"), case and plural kept;
    "" when no tag fits. A tag whose negative is the same, empty or already named in the sentence is skipped
    (the image may show it); of tags nested in one another ("cream" in "ice cream") only the longer is edited."""
    spots = []
    for tag, neg in zip(tags, neg_tags):
        tag, neg = str(tag).strip(), str(neg).strip()
        if not tag or not neg or tag.lower() == neg.lower() or _name_pattern(neg).search(sentence):
            continue
        match = _name_pattern(tag).search(sentence)
        if match:
            spots.append((match, neg))
    spots = [
        (m, neg)
        for m, neg in spots
        if not any(
            o.start() <= m.start() and m.end() <= o.end() and (o.end() - o.start()) > (m.end() - m.start())
            for o, _ in spots
        )
    ]
    if not spots:
        return ""
    match, neg = spots[int(rng.integers(len(spots)))]
    new = _plural(neg) if match.group("plural") else neg
    new = new[:1].upper() + new[1:] if match.group(0)[:1].isupper() else new
    head = sentence[: match.start()]
    article = re.search(r"\b(a|an)(\s+)$", head, re.IGNORECASE)
    if article:  # "an apple" -> "a banana": a grammar slip would tell the negative from the text alone
        word = "an" if new[:1].lower() in "aeiou" else "a"
        word = word.capitalize() if article.group(1)[:1].isupper() else word
        head = head[: article.start()] + word + article.group(2)
    return head + new + sentence[match.end() :]


def negative_part_stats(annotations: Iterable[dict], max_edit_words: int) -> dict:
    """Shares of aligned (positive, negative) parts of annotation records (desc/neg_desc, tags/neg_tags)
    that are identical or too far to be a minimal edit: what the training log records per generation."""
    kinds: Counter = Counter()
    for rec in annotations:
        for pk, nk in (("desc", "neg_desc"), ("tags", "neg_tags")):
            pos, neg = rec.get(pk) or [], rec.get(nk) or []
            if len(pos) == len(neg):
                kinds.update(negative_part_kind(p, q, max_edit_words) for p, q in zip(pos, neg))
            else:
                kinds["unaligned"] += len(pos)
    total = sum(kinds.values())
    share = {k: kinds[k] / total if total else 0.0 for k in ("same", "far", "unaligned")}
    return {
        "negative_parts": total,
        "identical_negative_share": share["same"],
        "too_far_negative_share": share["far"],
        "unaligned_negative_share": share["unaligned"],
    }


# Mined negatives (`loss.hni_negatives: mined`): the distinct sentences one training set may index; past this
# the index would not fit in every rank's job (a larger corpus wants an approximate index, not built here).
MINED_MAX_SENTENCES = 2_000_000


def neighbour_index(sentences: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """For each sentence, the other sentences of the set that differ from it by exactly one word (same
    length, one substitution; case and punctuation ignored), as {sentence: neighbours}; sentences without
    one are left out. Built by masking each word in turn: sentences that share a masked form are neighbours,
    so the cost is the number of words, not of sentence pairs. Generic English: any caption set."""
    by_words: dict[tuple, list[str]] = {}
    for s in sentences:
        words = words_of(s)
        if words:
            by_words.setdefault(words, []).append(s)
    if len(by_words) > MINED_MAX_SENTENCES:
        raise ValueError(
            f"mined negatives index at most {MINED_MAX_SENTENCES:,} distinct sentences, this set has {len(by_words):,}"
        )
    masked: dict[tuple, list[tuple]] = {}
    for words in by_words:
        for k in range(len(words)):
            masked.setdefault((k, words[:k], words[k + 1 :]), []).append(words)
    out: dict[str, tuple[str, ...]] = {}
    for words, texts in by_words.items():
        near = {w for k in range(len(words)) for w in masked[(k, words[:k], words[k + 1 :])] if w != words}
        if near:
            neighbours = tuple(sorted(by_words[w][0] for w in near))
            for s in texts:
                out[s] = neighbours
    return out
