"""The text draw of the HQ-CLIP loss (issue 10): paired HNI negatives, the edit-distance filter, short tag
texts and the three-way positive draw, each against a loop over rows."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import decode_tokens

from cycle.clip.negatives import (
    SWAP_CLASSES,
    negative_part_kind,
    negative_part_stats,
    neighbour_index,
    swap_edit,
    tag_edit,
    word_edit_distance,
    words_of,
)
from cycle.clip.text import TextDrawer, join_tags, tags_named_in
from cycle.config import ConfigError, LossConfig, load_config

COLORS = ["red", "green", "blue", "yellow", "pink", "white", "black", "brown"]
OBJECTS = ["apple", "chair", "kite", "drum", "boot", "lamp", "frog", "cup"]


def _row(i: int) -> dict:
    """Row i's four formulas: every text names the row, so a negative taken from another row shows."""
    c, o, other = COLORS[i % 8], OBJECTS[i % 8], COLORS[(i + 1) % 8]
    desc = [f"the image shows a {c} {o} number {i}.", f"the {o} {i} is on the left.", f"it sits on sand {i}."]
    neg_desc = [f"the image shows a {other} {o} number {i}.", f"the {o} {i} is on the right.", f"it sits on snow {i}."]
    tags = [f"{c} {o} {i}", f"{o} {i}", f"sand {i}"]
    neg_tags = [f"{other} {o} {i}", f"kite {i}" if o != "kite" else f"drum {i}", f"snow {i}"]
    return {"desc": desc, "neg_desc": neg_desc, "tags": tags, "neg_tags": neg_tags}


def _batch(n: int, annotated=None) -> dict:
    rows = [_row(i) for i in range(n)]
    batch = {k: [r[k] for r in rows] for k in ("desc", "neg_desc", "tags", "neg_tags")}
    batch.update(id=[f"s{i}" for i in range(n)], alt_text=[f"photo {i} of something" for i in range(n)])
    batch["annotated"] = annotated if annotated is not None else [True] * n
    return batch


def _cfg(**kw) -> LossConfig:
    return replace(LossConfig(), **kw)


def _norm(text: str) -> str:
    """The tokenizer's view of a text: lower case, spaces around punctuation, digits joined ("1 0" -> "10")."""
    text = " ".join(text.lower().replace(".", " . ").replace(",", " , ").split())
    return re.sub(r"(?<=\d) (?=\d)", "", text)


def test_each_rows_negative_is_the_aligned_edit_of_its_own_positive(tokenizer):
    n = 24
    cfg = _cfg(long_text_prob=0.4, short_text_prob=0.4, short_text_max_tags=3)
    batch = _batch(n)
    out = TextDrawer(cfg, tokenizer, seed=5)(batch, step=3)
    kinds = Counter()
    for i in range(n):  # the brute-force reference: row by row, from the row's own formulas
        pos, neg = decode_tokens(tokenizer, out["texts"][i]), decode_tokens(tokenizer, out["neg_texts"][i])
        row = _row(i)
        if _norm(pos) == _norm(batch["alt_text"][i]):
            kinds["alt"] += 1
            assert not out["neg_valid"][i] and neg == ""  # an alt-text positive has no HNI negative
            continue
        assert out["neg_valid"][i]
        sentences = [k for k, s in enumerate(row["desc"]) if _norm(s) in _norm(pos)]
        if sentences:  # a description: its sentences, in order, and the negative swaps each for its edit
            kinds["desc"] += 1
            assert _norm(pos) == _norm(" ".join(row["desc"][k] for k in sentences))
            assert _norm(neg) == _norm(" ".join(row["neg_desc"][k] for k in sentences))
        else:  # a tag text: 1 to 3 of the row's tags, and the same tags' edits joined alike
            kinds["tags"] += 1
            chosen = [k for k in range(3) if any(_norm(join_tags([row["tags"][k]])) == _norm(p) for p in _parts(pos))]
            assert 1 <= len(chosen) <= 3 and _norm(pos) == _norm(join_tags([row["tags"][k] for k in chosen]))
            assert _norm(neg) == _norm(join_tags([row["neg_tags"][k] for k in chosen]))
    assert kinds["alt"] and kinds["desc"] and kinds["tags"], kinds
    assert out["stats"]["long_text"] == kinds["desc"] and out["stats"]["short_text"] == kinds["tags"]


def _parts(tag_text: str) -> list[str]:
    return [p.strip() for chunk in tag_text.split(",") for p in chunk.split(" and ")]


def test_tag_texts_have_one_format_for_positives_and_negatives():
    assert [join_tags(t) for t in (["a"], ["a", "b"], ["a", "b", "c"])] == ["a", "a and b", "a, b and c"]


def test_word_edit_distance_against_known_values():
    assert word_edit_distance("A red apple.", "a red apple") == 0  # case and punctuation ignored
    assert word_edit_distance("a red apple", "a green apple") == 1
    assert word_edit_distance("a red apple on the left", "a apple on the right side") == 3
    assert word_edit_distance("", "two words") == 2
    assert negative_part_kind("a red apple", "a red apple", 2) == "same"
    assert negative_part_kind("a red apple", "a green apple", 2) == "edit"
    assert negative_part_kind("a red apple", "there is nothing here at all", 2) == "far"
    assert negative_part_kind("a red apple", "there is nothing here at all", 0) == "edit"  # 0: no bound


def test_edit_filter_keeps_minimal_edits_only(tokenizer):
    row = {
        "desc": ["a red apple is on the table.", "the sky is blue.", "a cat sleeps."],
        "neg_desc": [
            "a green apple is on the table.",  # a minimal edit: used
            "the sky is blue.",  # identical: its sentence stays as it is
            "an entirely different long sentence that may well be true of this image.",  # too far: not used
        ],
        "tags": ["red apple"],
        "neg_tags": ["red apple"],
    }
    far_only = {**row, "neg_desc": [row["neg_desc"][2]] * 3}
    batch = {
        "id": ["a", "b"],
        "alt_text": ["x", "y"],
        "annotated": [True, True],
        **{k: [row[k], far_only[k]] for k in row},
    }
    cfg = _cfg(long_text_prob=1.0, neg_max_edit_words=3)
    out = TextDrawer(cfg, tokenizer, seed=0)(batch, step=0)
    pos, neg = decode_tokens(tokenizer, out["texts"][0]), decode_tokens(tokenizer, out["neg_texts"][0])
    assert _norm(pos) == _norm(" ".join(row["desc"]))  # all three fit the context
    assert _norm(neg) == _norm("a green apple is on the table. the sky is blue. a cat sleeps.")
    assert out["neg_valid"].tolist() == [True, False]  # row b: no minimal edit left, dropped
    assert out["stats"]["neg_too_far"] == 1 and out["stats"]["neg_desc"] == 2
    # without the bound row b's rewritten sentences are used
    loose = TextDrawer(replace(cfg, neg_max_edit_words=0), tokenizer, seed=0)(batch, step=0)
    assert loose["neg_valid"].tolist() == [True, True] and loose["stats"].get("neg_too_far", 0) == 0
    # identical tags never reach the loss
    tags_only = TextDrawer(_cfg(long_text_prob=0.0, short_text_prob=1.0), tokenizer)(batch, step=0)
    assert not tags_only["neg_valid"].any() and tags_only["stats"]["neg_same_as_pos"] == 2


def test_swap_edit_changes_one_word_of_its_class():
    import numpy as np

    rng = np.random.default_rng(0)
    sentence = "Two cats on the left and three red balls at the top."
    seen = set()
    for _ in range(200):
        out = swap_edit(sentence, rng)
        a, b = sentence.split(" "), out.split(" ")
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(changed) == 1 and word_edit_distance(sentence, out) == 1
        ((x, y),) = changed
        seen.add(x)
        assert y.endswith(".") == x.endswith(".")  # punctuation kept
        classes = [c for c in SWAP_CLASSES if x.strip(".").lower() in c]
        assert classes and y.strip(".").lower() in classes[0] and y != x
        assert y[0].isupper() == x[0].isupper()  # "Two" -> "Three", not "three"
    assert seen == {"Two", "left", "three", "red", "top."}  # every swappable word gets its turn
    assert swap_edit("a cat sleeps on a mat.", rng) == ""  # nothing to swap: no edit
    assert swap_edit("a cat on the left.", np.random.default_rng(3)) == "a cat on the right."


def test_repair_gives_unusable_description_negatives_a_rule_edit(tokenizer):
    """`loss.neg_repair: swap`: a description whose negative is identical, too far or missing gets one
    swapped word; a row with a usable edit keeps the annotator's; tags and alt-text are untouched."""
    good = {"desc": ["a red apple on the left."], "neg_desc": ["a green apple on the left."]}
    same = {"desc": ["two cats on the left."], "neg_desc": ["two cats on the left."]}
    far = {"desc": ["three dogs at the top."], "neg_desc": ["nothing at all is in this image of the sea today."]}
    missing = {"desc": ["a blue kite at the bottom."], "neg_desc": []}
    plain = {"desc": ["a cat sleeps."], "neg_desc": ["a cat sleeps."]}
    rows = [good, same, far, missing, plain]
    batch = {
        "id": [f"r{i}" for i in range(5)],
        "alt_text": ["x"] * 5,
        "annotated": [True] * 5,
        "desc": [r["desc"] for r in rows],
        "neg_desc": [r["neg_desc"] for r in rows],
        "tags": [["t"]] * 5,
        "neg_tags": [["t"]] * 5,
    }
    cfg = _cfg(long_text_prob=1.0, neg_max_edit_words=3)
    before = TextDrawer(cfg, tokenizer, seed=0)(batch, step=0)
    after = TextDrawer(replace(cfg, neg_repair="swap"), tokenizer, seed=0)(batch, step=0)
    assert before["neg_valid"].tolist() == [True, False, False, False, False]
    assert after["neg_valid"].tolist() == [True, True, True, True, False]  # "a cat sleeps." has no swappable word
    assert after["stats"]["neg_repaired"] == 3
    assert torch.equal(after["texts"], before["texts"])  # positives as before: the repair draws last
    assert torch.equal(after["neg_texts"][0], before["neg_texts"][0])  # the annotator's edit is kept
    for i in (1, 2, 3):
        pos, neg = (decode_tokens(tokenizer, after[k][i]) for k in ("texts", "neg_texts"))
        assert word_edit_distance(pos, neg) == 1, (pos, neg)


def test_negative_part_stats_count_identical_and_far_parts():
    stats = negative_part_stats(
        [
            {"desc": ["a b c"], "neg_desc": ["a b c"], "tags": ["x", "y"], "neg_tags": ["z", "y"]},
            {"desc": ["a b c"], "neg_desc": ["q r s t u v"], "tags": ["x"], "neg_tags": []},
        ],
        max_edit_words=3,
    )
    # parts: desc same, tag edit, tag same, desc far, one unaligned tag
    assert stats["negative_parts"] == 5
    assert stats["identical_negative_share"] == pytest.approx(2 / 5)
    assert stats["too_far_negative_share"] == pytest.approx(1 / 5)
    assert stats["unaligned_negative_share"] == pytest.approx(1 / 5)


def test_three_way_positive_draw_rates(tokenizer):
    n, rates = 3000, {"desc": 0.3, "tags": 0.5, "alt": 0.2}
    cfg = _cfg(long_text_prob=rates["desc"], short_text_prob=rates["tags"])
    drawer = TextDrawer(cfg, tokenizer, seed=11, negatives=False)
    batch = _batch(n)
    batch["id"] = [f"row-{i}" for i in range(n)]
    out = drawer(batch, step=0)
    got = {"desc": out["stats"]["long_text"], "tags": out["stats"]["short_text"]}
    got["alt"] = sum(_norm(decode_tokens(tokenizer, out["texts"][i])) == _norm(batch["alt_text"][i]) for i in range(n))
    assert sum(got.values()) == n
    for k, p in rates.items():  # binomial: 4 standard deviations
        assert abs(got[k] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, got)
    # a row without tags or descriptions falls back to its alt-text
    bare = drawer({**_batch(4), "tags": [[]] * 4, "desc": [[]] * 4}, step=0)
    assert [decode_tokens(tokenizer, r) for r in bare["texts"]] == [f"photo {i} of something" for i in range(4)]


def test_independent_mode_keeps_the_old_draw(tokenizer):
    cfg = _cfg(long_text_prob=0.0, hni_negatives="independent", neg_tags_prob=0.0)
    out = TextDrawer(cfg, tokenizer, seed=0)(_batch(4), step=0)
    for i in range(4):  # alt-text positives, yet a negative description: what "paired" forbids
        assert decode_tokens(tokenizer, out["texts"][i]) == f"photo {i} of something"
        assert out["neg_valid"][i] and f"number {i}" in decode_tokens(tokenizer, out["neg_texts"][i])


@pytest.mark.parametrize(
    "override,key",
    [
        (["loss.long_text_prob=0.7", "loss.short_text_prob=0.4"], "loss.short_text_prob"),
        (["loss.short_text_prob=-0.1"], "loss.short_text_prob"),
        (["loss.stc_head=mlp"], "loss.stc_head"),
        (["loss.hni_negatives=random"], "loss.hni_negatives"),
        (["loss.neg_max_edit_words=-1"], "loss.neg_max_edit_words"),
        (["loss.short_text_max_tags=0"], "loss.short_text_max_tags"),
        (["loss.neg_repair=shuffle"], "loss.neg_repair"),
    ],
)
def test_new_loss_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, ["name=x", *override])


def test_tags_named_in_texts():
    vocab = ["dog", "hot dog", "blue background", "cat"]
    got = tags_named_in([["two hot dogs on a blue background."], ["a dog.", "Dogs!"], []], vocab)
    assert got.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert got.dtype == torch.float32


def test_tag_edit_replaces_one_named_tag_by_its_negative():
    import numpy as np

    rng = np.random.default_rng(0)
    sentence = "Two parachutes on the right and an ice cream, on a red background."
    tags, neg_tags = ["parachute", "cream", "ice cream", "red background"], ["kite", "milk", "apple", "red background"]
    seen = set()
    for _ in range(100):
        out = tag_edit(sentence, tags, neg_tags, rng)
        seen.add(out)
        assert word_edit_distance(sentence, out) <= 2
    # plural kept ("parachutes" -> "kites"), article fixed ("an ice cream" -> "an apple"), "cream" nested in
    # "ice cream" never edited alone, a tag equal to its negative never edited
    assert seen == {
        "Two kites on the right and an ice cream, on a red background.",
        "Two parachutes on the right and an apple, on a red background.",
    }
    assert tag_edit("A box at the top.", ["box"], ["fox"], rng) == "A fox at the top."
    assert tag_edit("An owl at the top.", ["owl"], ["cat"], rng) == "A cat at the top."
    assert tag_edit("two boxes.", ["box"], ["peach"], rng) == "two peaches."
    # the negative is named in the sentence (it may be in the image): not an edit; nothing named: no edit
    assert tag_edit("a cat and a dog.", ["cat"], ["dog"], rng) == ""
    assert tag_edit("a cat sleeps.", ["bird"], ["fish"], rng) == ""
    assert tag_edit("a catalogue.", ["cat"], ["dog"], rng) == ""  # whole words only


def test_tag_repair_gives_unedited_descriptions_an_object_edit(tokenizer):
    """`loss.neg_repair: tags`: a description without a usable edit gets one named tag replaced by its negative
    tag; a row with the annotator's edit keeps it; a row whose tags are not aligned gets none."""
    rows = [
        ({"desc": ["a red apple on the left."], "neg_desc": ["a red apple on the right."]}, ["apple"], ["pear"]),
        ({"desc": ["two cats on the left."], "neg_desc": ["two cats on the left."]}, ["cat"], ["owl"]),
        ({"desc": ["a kite at the top."], "neg_desc": []}, ["kite", "sky"], ["drum"]),  # tags not aligned
    ]
    batch = {
        "id": [f"r{i}" for i in range(3)],
        "alt_text": ["x"] * 3,
        "annotated": [True] * 3,
        "desc": [r["desc"] for r, _, _ in rows],
        "neg_desc": [r["neg_desc"] for r, _, _ in rows],
        "tags": [t for _, t, _ in rows],
        "neg_tags": [n for _, _, n in rows],
    }
    cfg = _cfg(long_text_prob=1.0)
    before = TextDrawer(cfg, tokenizer, seed=0)(batch, step=0)
    after = TextDrawer(replace(cfg, neg_repair="tags"), tokenizer, seed=0)(batch, step=0)
    assert after["neg_valid"].tolist() == [True, True, False] and after["stats"]["neg_repaired"] == 1
    assert torch.equal(after["texts"], before["texts"]) and torch.equal(after["neg_texts"][0], before["neg_texts"][0])
    assert decode_tokens(tokenizer, after["neg_texts"][1]).replace(" .", ".") == "two owls on the left."


def test_neighbour_index_against_all_pairs():
    import numpy as np

    rng = np.random.default_rng(3)
    words = ["a", "red", "blue", "cat", "dog", "left", "right", "two", "on", "the"]
    sentences = {" ".join(rng.choice(words, size=int(rng.integers(2, 5)))) + "." for _ in range(300)}
    sentences |= {"A red cat!", "a red cat."}  # one sentence in two spellings: the same words, no neighbours
    got = neighbour_index(sorted(sentences))
    for s in sorted(sentences):  # the reference: every pair, same length and one word apart
        want = {
            words_of(t)
            for t in sentences
            if len(words_of(t)) == len(words_of(s)) and word_edit_distance(s, t) == 1 and words_of(t) != words_of(s)
        }
        assert {words_of(t) for t in got.get(s, ())} == want, s
    assert got["A red cat!"] == got["a red cat."]


def test_mined_negatives_are_other_images_sentences_one_word_away(tokenizer):
    n = 8
    desc = [[f"a {c} kite on the left."] for c in ("red", "blue")] + [["a red kite on the right."]]
    desc += [[f"a {o} on sand {i}."] for i, o in enumerate(("drum", "boot", "lamp", "frog", "cup"))]
    desc[0].append("a blue kite on the left.")  # row 0 also says row 1's sentence: never its negative
    batch = {**_batch(n), "desc": desc, "neg_desc": [[s.replace("a ", "no ") for s in d] for d in desc]}
    index = neighbour_index(sorted({s for d in desc for s in d}))
    cfg = _cfg(long_text_prob=1.0, hni_negatives="mined", text_fit="truncate")
    out = TextDrawer(cfg, tokenizer, seed=2, neighbours=index)(batch, step=1)
    paired = TextDrawer(replace(cfg, hni_negatives="paired"), tokenizer, seed=2)(batch, step=1)
    assert torch.equal(out["texts"], paired["texts"])  # the mined draw leaves the positives as they were
    negs = [_norm(decode_tokens(tokenizer, t)) for t in out["neg_texts"]]
    assert negs[0] == _norm("a red kite on the right. a blue kite on the left.")  # not "a blue kite on the left."
    assert negs[1] == _norm("a red kite on the left.")
    assert negs[2] == _norm("a red kite on the left.")
    assert out["neg_valid"][:3].all() and not out["neg_valid"][3:].any()  # rows 3-7: no neighbour, no negative
    assert out["stats"]["neg_same_as_pos"] == n - 3
