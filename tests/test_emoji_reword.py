"""Other wordings of the held-out captions (`cycle.data.emoji.reword`): not the teacher's template, not
alt-text noise, the same facts, aligned negatives, deterministic, and the rest of the dataset untouched."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import replace
from functools import lru_cache

import pytest
from test_emoji_text import edit_kind, scenes

from cycle.config import EmojiScenesConfig
from cycle.data.emoji.altnoise import FILENAME, GENERIC, SHOP_SPAM
from cycle.data.emoji.edits import EDITS, apply_edit
from cycle.data.emoji.facts import fact_prf, scene_facts, text_facts
from cycle.data.emoji.language import COLORS, COUNT_WORDS, count_phrase, describe, plural
from cycle.data.emoji.plan import plan_emoji_scenes
from cycle.data.emoji.reword import POSITION_VARIANTS, TEMPLATES, Style, draw_styles, render, synonyms
from cycle.data.emoji.vocab import load_vocab

REWORDED_SPLITS = ("test_retrieval", "test_negatives", "test_compositional")
CFG = EmojiScenesConfig(
    vocab_size=30, n_train=300, n_val=30, n_test_retrieval=60, n_test_negatives=60, n_test_compositional=30
)


@pytest.fixture(scope="module")
def vocab():
    return load_vocab(200)


@pytest.fixture(scope="module")
def plan():
    return plan_emoji_scenes(CFG)


# ------------------------------------------------------------------- an independent reader of the wordings
_CLAUSES = re.compile(r"; |\. | \| |, plus |, and ")
_COUNT = {"a": 1, "an": 1, **{w: i for i, w in enumerate(COUNT_WORDS)}, **{f"{i}": i for i in range(10)}}
_COUNT_BEFORE = re.compile(r"\b(a|an|" + "|".join(COUNT_WORDS[1:]) + r"|\d)x?\s+$")
_PLACES = {phrase: pos for variant in POSITION_VARIANTS for pos, phrase in variant.items()}
_PLACES.update({pos: pos for pos in POSITION_VARIANTS[0]})  # the tally's bare words
_COLOR = "(" + "|".join(COLORS) + ")"
_BACKDROP = re.compile(rf"\b{_COLOR} backdrop\b|\bbackdrop(?: is|:) {_COLOR}\b")


def clauses(text: str) -> list[str]:
    return [c.strip().rstrip(".") for c in _CLAUSES.split(text)]


@lru_cache(maxsize=4)
def _nouns(names: tuple[str, ...]) -> tuple[re.Pattern, dict[str, str]]:
    """How each object can be said (name, plural, '<keyword> emoji') -> its name, and a pattern of them all."""
    surface = {}
    for name in names:
        surface.update({name: name, plural(name): name, **{f"{k} emoji": name for k in synonyms(name)}})
    alternatives = "|".join(map(re.escape, sorted(surface, key=len, reverse=True)))
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])"), surface


def reworded_facts(text: str, vocab) -> tuple[set, str]:
    """(facts, background) read from a reworded caption: one object per clause (its name, plural or
    '<keyword> emoji'), the count just before it, the one place said anywhere else in its clause."""
    noun, surface = _nouns(tuple(vocab.names))
    facts, backgrounds = set(), [a or b for a, b in _BACKDROP.findall(text)]
    for clause in clauses(text):
        found = list(noun.finditer(clause))
        if not found:
            continue
        assert len(found) == 1, (clause, text)
        m, name = found[0], surface[found[0].group(1)]
        count = _COUNT_BEFORE.search(clause[: m.start()])
        assert count, (clause, text)
        rest = clause[: count.start()] + " " + clause[m.end() :]
        places = {pos for phrase, pos in _PLACES.items() if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", rest)}
        assert len(places) == 1, (clause, text)
        facts |= {("object", name), ("count", name, _COUNT[count.group(1)]), ("position", name, places.pop())}
    assert len(backgrounds) == 1, text
    return facts, backgrounds[0]


def differing_span(a: str, b: str) -> tuple[int, int]:
    """Words of `a` and of `b` between their common prefix and common suffix."""
    x, y = a.split(), b.split()
    n, start, end = min(len(x), len(y)), 0, 0
    while start < n and x[start] == y[start]:
        start += 1
    while end < n - start and x[-1 - end] == y[-1 - end]:
        end += 1
    return len(x) - start - end, len(y) - start - end


def uses_no_teacher_or_noise_frame(text: str, scene: dict) -> bool:
    spam_parts = {p.strip(" -|!:,").lower() for t in SHOP_SPAM for p in t.split("{Name}")} - {""}
    file_parts = {t.split("{")[0].lower() for t in FILENAME}
    bare = text  # the frame alone: an object's own name ("framed picture") is no noise frame
    for form in sorted({f for o in scene["objects"] for f in (o["name"], plural(o["name"]))}, key=len, reverse=True):
        bare = bare.replace(form, "#")
    return (
        text != describe(scene)
        and "the image shows" not in text
        and "background" not in text  # the template's ", on a blue background." and the seeds' colour tag
        and text not in GENERIC
        and not any(re.search(rf"(?<!\w){re.escape(g)}(?!\w)", bare) for g in GENERIC)
        and not any(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", bare) for p in spam_parts)
        and not any(p in bare for p in file_parts)
        and text not in {count_phrase(o["name"], o["count"]) for o in scene["objects"]}
    )


# --------------------------------------------------------------------------------------------------- tests
def test_every_template_says_the_scene_and_nothing_the_teacher_or_noise_says(vocab):
    rng, seen = random.Random(5), Counter()
    for scene in scenes(vocab, 600, max_count=9):
        for style in draw_styles(len(scene["objects"]), rng, len(TEMPLATES)):
            text = render(style, scene)
            seen[style.template] += 1
            assert uses_no_teacher_or_noise_frame(text, scene), text
            facts, background = reworded_facts(text, vocab)
            assert facts == scene_facts(scene) and background == scene["background"], text
            readable = style.template in ("holding", "placed") and style.positions == 0 and not style.numerals
            if readable and not any(style.synonym[i] and synonyms(o["name"]) for i, o in enumerate(scene["objects"])):
                # the wordings facts.py can read (names, count words, its position phrases): F1 = 1 there too
                assert fact_prf(text_facts(text, vocab), scene_facts(scene))["f1"] == 1.0, text
                seen["facts.py"] += 1
    assert set(seen) == {*TEMPLATES, "facts.py"} and min(seen.values()) > 50


def test_synonyms_are_keywords_of_one_object_only(vocab):
    table = {o.name: synonyms(o.name) for o in vocab}
    assert sum(map(bool, table.values())) > len(vocab) // 3  # many objects can be said another way
    owners = Counter(k for ks in table.values() for k in ks)
    assert max(owners.values()) == 1
    for obj in vocab:
        assert set(table[obj.name]) <= set(obj.keywords) and obj.name not in table[obj.name]
        assert not text_facts([f"a {k} emoji" for k in table[obj.name]], vocab)  # names no object by accident
    assert "tortoise" in synonyms("turtle") and synonyms("dog") == ()  # CLDR: turtle | terrapin | tortoise


def test_a_style_says_a_count_as_words_or_numerals():
    scene = {
        "background": "blue",
        "objects": [{"name": "turtle", "count": 1, "position": "left"}, {"name": "dog", "count": 2, "position": "top"}],
    }
    base = dict(positions=1, numerals=False, one="a", synonym=(False, False), pick=(0, 0))
    assert render(Style("pos_first", **base), scene) == "to the left, a turtle; up top, two dogs; blue backdrop."
    numerals = {**base, "numerals": True, "synonym": (True, True), "pick": (1, 0)}
    assert render(Style("colons", **numerals), scene) == "blue backdrop. to the left: 1 tortoise emoji. up top: 2 dogs."
    assert render(Style("tally", **base), scene) == "left - 1x turtle | top - 2x dog | backdrop: blue"
    assert render(Style("placed", **{**base, "one": "one", "positions": 0}), scene) == (
        "one turtle, placed on the left, and two dogs, placed at the top; the backdrop is blue."
    )


def test_plan_rewords_the_heldout_splits_only(plan):
    vocab = plan.vocab
    per_row = Counter()
    for row in plan.rows:
        meta = row.meta
        if row.split not in REWORDED_SPLITS:
            assert "reworded" not in meta
            continue
        rew = meta["reworded"]
        texts = rew["captions"] if "captions" in rew else [rew["positive"]]
        assert len(texts) == len(rew["styles"]) and len({s["template"] for s in rew["styles"]}) == len(texts)
        for text in texts:
            assert uses_no_teacher_or_noise_frame(text, row.scene), text
            assert reworded_facts(text, vocab) == (scene_facts(row.scene), row.scene["background"])
            assert text not in meta.get("captions", []) + [meta.get("positive"), row.alt_text]
        if row.split == "test_negatives":
            assert len(texts) == 1
        else:
            per_row[len(texts)] += 1
    assert set(per_row) == {1, 2, 3}  # how many wordings a caption gets varies with the row


def test_negatives_are_the_same_edits_in_the_same_wording(plan):
    vocab, checked = plan.vocab, Counter()
    for row in plan.rows:
        if row.split != "test_negatives":
            continue
        rew, meta = row.meta["reworded"], row.meta
        pos_facts, _ = reworded_facts(rew["positive"], vocab)
        assert [n["edit"] for n in rew["negatives"]] == [n["edit"] for n in meta["negatives"]] == list(EDITS)
        for neg, template_neg in zip(rew["negatives"], meta["negatives"]):
            neg_facts, background = reworded_facts(neg["text"], vocab)
            # the edit the template negative makes, said in the positive's wording
            assert neg_facts == text_facts(template_neg["text"], vocab) and background == row.scene["background"]
            assert edit_kind(pos_facts, neg_facts) == neg["edit"]
            a, b = clauses(rew["positive"]), clauses(neg["text"])
            changed = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            assert len(a) == len(b) and changed, neg  # same structure, something changed
            if neg["edit"] != "relation":  # one object's clause; a swap of places changes two
                assert len(changed) == 1
            for i in changed:  # in the same place: the rest of the clause is as it was
                assert max(differing_span(a[i], b[i])) <= 4, (a[i], b[i])  # "on the left side" <-> "near the top"
            checked[neg["edit"]] += 1
    assert checked == {e: CFG.n_test_negatives for e in EDITS}


def test_an_edited_graph_rendered_in_one_style_changes_only_the_edited_words(vocab):
    rng = random.Random(3)
    for scene in scenes(vocab, 200, max_count=9):
        (style,) = draw_styles(len(scene["objects"]), rng, 1)
        for kind in ("object", "count"):
            edited, _ = apply_edit(kind, scene, vocab, rng, 9)
            a, b = render(style, scene), render(style, edited)
            # one short span differs: a name (up to three words) or keyword, or a count and its noun
            assert a != b and 0 < max(differing_span(a, b)) <= 4, (a, b)


def test_same_seed_same_wordings_and_another_seed_others(plan):
    again = plan_emoji_scenes(CFG)
    assert [r.meta for r in again.rows] == [r.meta for r in plan.rows]
    other = plan_emoji_scenes(replace(CFG, seed=1))
    assert [r.meta.get("reworded") for r in other.rows] != [r.meta.get("reworded") for r in plan.rows]


# The tiny config's plan as it was before rewording existed (rows' id, alt-text and meta without
# `reworded`, and the teacher seeds): the rewording must leave every other text of the dataset as it was.
TINY_DIGEST_BEFORE_REWORDING = "f338f55145cfd528a72e938b220c7d9740beddbcc513225fd1c852a4261978d8"


def test_rewording_changes_no_other_text(tiny_cfg):
    tiny = plan_emoji_scenes(tiny_cfg.data.emoji)
    rows = [(r.id, r.alt_text, {k: v for k, v in r.meta.items() if k != "reworded"}) for r in tiny.rows]
    text = json.dumps([rows, tiny.seeds], sort_keys=True, ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == TINY_DIGEST_BEFORE_REWORDING
