"""emoji-scenes without pixels: vocabulary, grammar, facts, edits, alt-text noise, seeds, config errors."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from cycle.config import AltNoiseConfig, ConfigError, EmojiScenesConfig
from cycle.data.emoji.altnoise import KINDS, alt_text_of, corrupt
from cycle.data.emoji.edits import apply_edit
from cycle.data.emoji.facts import fact_prf, scene_facts, text_facts
from cycle.data.emoji.language import describe, plural
from cycle.data.emoji.plan import plan_emoji_scenes
from cycle.data.emoji.scenes import SceneSampler
from cycle.data.emoji.seeds import seed_annotation
from cycle.data.emoji.vocab import candidates, load_vocab


@pytest.fixture(scope="module")
def vocab():
    return load_vocab(200)


def scenes(vocab, n, seed=0, max_objects=3, max_count=3):
    sampler = SceneSampler(vocab, 64, max_objects, max_count, random.Random(seed))
    return [sampler.scene(plain=i % 4 == 0) for i in range(n)]


def test_vocab_is_fixed_concrete_and_has_siblings(vocab):
    assert load_vocab(200).names == vocab.names and len(set(vocab.names)) == 200
    groups = {o.group for o in vocab}
    assert groups == {"Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects"}
    assert not any("face" in o.name.split() or "flag" in o.name for o in vocab)
    small = load_vocab(24)
    assert len({o.group for o in small}) == 5  # even a tiny vocabulary spans the groups
    for obj in small:
        sibs = small.siblings(obj.name)
        assert sibs and obj.name not in sibs
    # keywords never name an object, so a tag like "pet" cannot read as "dog"
    every = [o.name for o in candidates()]
    assert all(not text_facts(k, every) for o in vocab for k in (*o.keywords, o.category))


def test_plural_and_facts_read_tricky_names(vocab):
    assert plural("ear of corn") == "ears of corn" and plural("mouse") == "mice" and plural("wolf") == "wolves"
    facts = text_facts("two hot dogs at the top and a top hat at the bottom", ["dog", "hot dog", "top hat"])
    assert facts == {
        ("object", "hot dog"),
        ("count", "hot dog", 2),
        ("position", "hot dog", "top"),
        ("object", "top hat"),
        ("count", "top hat", 1),
        ("position", "top hat", "bottom"),
    }
    assert text_facts("Buy Hot Dog Stickers", ["dog", "hot dog"]) == {("object", "hot dog")}
    assert text_facts(["dog", "pet"], ["dog"]) == {("object", "dog")}
    assert text_facts("IMG_2041.png", vocab) == set() and text_facts(None, vocab) == set()


def test_fact_prf():
    true = {("object", "dog"), ("count", "dog", 2)}
    assert fact_prf(true, true)["f1"] == 1.0
    half = fact_prf({("object", "dog"), ("object", "cat")}, true)
    assert half == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert fact_prf(set(), true)["f1"] == 0.0 and fact_prf(set(), set())["f1"] == 1.0
    assert fact_prf({("object", "dog")}, true, kind="object")["f1"] == 1.0


def test_clean_description_states_exactly_the_scene(vocab):
    for scene in scenes(vocab, 500):
        text = describe(scene)
        assert text.startswith("the image shows ") and text == text.lower()
        assert text_facts(text, vocab) == scene_facts(scene), text


def test_each_edit_changes_exactly_what_it_says(vocab):
    rng = random.Random(1)
    for scene in scenes(vocab, 300):
        true = scene_facts(scene)
        for kind in ("object", "relation", "count"):
            edited, _ = apply_edit(kind, scene, vocab, rng, max_count=3)
            assert describe(edited) != describe(scene)
            assert edit_kind(true, text_facts(describe(edited), vocab)) == kind


def edit_kind(pos: set, neg: set) -> str:
    """Which single edit turns the facts `pos` into `neg` ("object", "relation", "count"), else "other"."""

    def table(facts, k):
        return {f[1]: f[2] for f in facts if f[0] == k}

    objs_p, objs_n = {f[1] for f in pos if f[0] == "object"}, {f[1] for f in neg if f[0] == "object"}
    cnt_p, cnt_n = table(pos, "count"), table(neg, "count")
    pos_p, pos_n = table(pos, "position"), table(neg, "position")
    if objs_p != objs_n:
        gone, new = objs_p - objs_n, objs_n - objs_p
        if len(gone) == len(new) == 1:
            (a,), (b,) = gone, new
            rest = objs_p - gone
            if (cnt_p[a], pos_p[a]) == (cnt_n[b], pos_n[b]) and all(
                (cnt_p[o], pos_p[o]) == (cnt_n[o], pos_n[o]) for o in rest
            ):
                return "object"
        return "other"
    if cnt_p == cnt_n and pos_p != pos_n:
        return "relation"
    if pos_p == pos_n and sum(cnt_p[o] != cnt_n[o] for o in objs_p) == 1:
        return "count"
    return "other"


def test_alt_noise_rates_and_kinds(vocab):
    rates = AltNoiseConfig()
    rng, sample = random.Random(7), scenes(vocab, 4000, seed=3)
    drawn = [corrupt(s, vocab, rates, rng, 3) for s in sample]
    freq = Counter(kind for _, kind in drawn)
    for kind in KINDS:
        assert abs(freq[kind] / len(sample) - getattr(rates, kind)) < 0.025, (kind, freq)
    assert abs(freq["none"] / len(sample) - (1 - sum(getattr(rates, k) for k in KINDS))) < 0.025
    f1 = {k: [] for k in (*KINDS, "none")}
    for scene, (text, kind) in zip(sample, drawn):
        pred, true = text_facts(text, vocab), scene_facts(scene)
        f1[kind].append(fact_prf(pred, true)["f1"])
        if kind in ("generic", "filename"):
            assert pred == set(), text
        elif kind == "shop_spam":
            assert len(pred) == 1 and pred <= true, text
        elif kind == "one_object":
            assert pred <= true and len(pred) == 2
        elif kind == "none":
            assert pred == true
        else:  # wrong_count, wrong_position, sibling_name: a statement that is false
            assert pred != true and not pred <= true
    assert all(sum(v) / len(v) < 1.0 for k, v in f1.items() if k != "none")
    mean = sum(sum(v) for v in f1.values()) / len(sample)
    assert mean < 0.8  # noisy alt-text is measurably worse than the clean description (1.0)


def test_zero_rates_keep_clean_text(vocab):
    zero = AltNoiseConfig(**{k: 0.0 for k in KINDS})
    rng = random.Random(0)
    assert all(corrupt(s, vocab, zero, rng, 3) == (describe(s), "none") for s in scenes(vocab, 50))
    with pytest.raises(ValueError, match="unknown alt-text noise"):
        alt_text_of("typo", scenes(vocab, 1)[0], vocab, rng, 3)


def test_seed_formulas_are_aligned_minimal_and_short(vocab):
    rng = random.Random(2)
    for scene in scenes(vocab, 300):
        ann = seed_annotation(scene, vocab, rng, max_count=3)
        assert len(ann["desc"]) == len(ann["neg_desc"]) == len(ann["edits"]["neg_desc"]) == 1
        assert text_facts(ann["desc"], vocab) == scene_facts(scene)
        assert edit_kind(scene_facts(scene), text_facts(ann["neg_desc"], vocab)) == ann["edits"]["neg_desc"][0]
        tags, neg = ann["tags"], ann["neg_tags"]
        assert 3 <= len(tags) <= 7 and len(neg) == len(tags) == len(ann["edits"]["neg_tags"])
        assert all(t != n for t, n in zip(tags, neg)) and not set(neg) & set(tags)
        names = {o["name"] for o in scene["objects"]}
        assert {f[1] for f in text_facts(tags, vocab)} == names  # tags name exactly the objects
        assert not {f[1] for f in text_facts(neg, vocab)} & names  # negatives name none of them
        assert len(" ".join(ann["desc"] + ann["neg_desc"] + tags + neg).split()) < 80


def test_plan_is_text_only_and_deterministic():
    cfg = EmojiScenesConfig(
        vocab_size=30,
        n_train=300,
        n_val=30,
        n_test_retrieval=30,
        n_test_negatives=30,
        n_test_compositional=20,
        image_size=32,
    )
    a, b = plan_emoji_scenes(cfg), plan_emoji_scenes(cfg)
    assert [(r.id, r.alt_text, r.meta) for r in a.rows] == [(r.id, r.alt_text, r.meta) for r in b.rows]
    c = plan_emoji_scenes(replace(cfg, seed=1))
    assert [r.meta["clean"] for r in a.rows] != [r.meta["clean"] for r in c.rows]
    counts = Counter(o["name"] for r in a.rows if r.split == "train" for o in r.meta["scene"]["objects"])
    assert len(counts) == 30 and min(counts.values()) >= 10  # every object in many training scenes


@pytest.mark.parametrize(
    "change, key",
    [
        ({"max_objects": 4}, "data.emoji.max_objects"),
        ({"max_count": 10}, "data.emoji.max_count"),
        ({"vocab_size": 5000}, "data.emoji.vocab_size"),
        ({"image_size": 8}, "data.emoji.image_size"),
        ({"n_train": -1}, "data.emoji.n_train"),
        ({"seed_share": 1.5}, "data.emoji.seed_share"),
        ({"heldout_pair_share": 0.0}, "data.emoji.n_test_compositional"),
        ({"max_objects": 1}, "data.emoji.n_test_compositional"),
        ({"alt_noise": AltNoiseConfig(generic=0.9)}, "data.emoji.alt_noise"),
        ({"vocab_size": 2, "max_objects": 2, "max_count": 1, "n_test_retrieval": 500}, "data.emoji.n_test_retrieval"),
    ],
)
def test_bad_config_names_its_key(change, key):
    cfg = replace(
        EmojiScenesConfig(n_train=20, n_val=5, n_test_retrieval=5, n_test_negatives=5, n_test_compositional=3), **change
    )
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        plan_emoji_scenes(cfg)
