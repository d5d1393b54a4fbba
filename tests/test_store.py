"""The LanceDB store: idempotent keyed inserts, pinned versions and tags, compaction."""

from __future__ import annotations

import pytest

from cycle.store import TEACHER, Store, gen_tag


def annotation(i: int, generation: int = 1, desc: str = "a cat") -> dict:
    return {
        "id": f"img-{i:03d}",
        "generation": generation,
        "desc": [desc],
        "neg_desc": ["a dog"],
        "tags": ["cat"],
        "neg_tags": ["dog"],
        "status": "ok",
        "attempts": 1,
    }


@pytest.fixture()
def store(tmp_path):
    return Store(tmp_path / "lance")


def test_insert_same_batch_twice_keeps_one_copy_and_makes_no_version(store):
    batch = [annotation(i) for i in range(10)]
    assert store.insert_new("annotations", batch) == 10
    versions = store.versions("annotations")
    assert store.insert_new("annotations", batch) == 0
    assert store.count("annotations") == 10
    assert store.versions("annotations") == versions  # nothing new, no commit


def test_partial_overlap_inserts_only_new_keys_and_keeps_the_first_copy(store):
    store.insert_new("annotations", [annotation(i) for i in range(6)])
    # rows 3..5 overlap (with a different text: the stored copy must win), 6..8 are new, and
    # generation 2 of row 0 is another key
    later = [annotation(i, desc="rewritten") for i in range(3, 9)] + [annotation(0, generation=2)]
    assert store.insert_new("annotations", later) == 4
    assert store.count("annotations") == 10
    rows = store.read("annotations", ["id", "generation", "desc"]).to_pylist()
    by_key = {(r["id"], r["generation"]): r["desc"] for r in rows}
    assert by_key[("img-004", 1)] == ["a cat"]
    assert by_key[("img-007", 1)] == ["rewritten"]
    assert ("img-000", 2) in by_key
    assert store.count_by("annotations", "generation") == {1: 9, 2: 1}


def test_duplicate_keys_within_one_batch_keep_the_first(store):
    batch = [annotation(1, desc="first"), annotation(1, desc="second"), annotation(2)]
    assert store.insert_new("annotations", batch) == 2
    assert store.insert_new("annotations", [annotation(3), annotation(3, desc="x"), annotation(1)]) == 1
    assert store.read("annotations", ["desc"], where="id = 'img-001'").column("desc").to_pylist() == [["first"]]


def test_keys_with_quotes_are_looked_up_safely(store):
    rows = [{"id": "it's", "desc": ["x"]}, {"id": "plain", "desc": ["y"]}]
    assert store.insert_new("teacher", rows) == 2
    assert store.insert_new("teacher", rows + [{"id": "o'hara'", "desc": ["z"]}]) == 1
    assert store.ids("teacher") == {"it's", "plain", "o'hara'"}


def test_tag_pins_an_old_version(store):
    store.insert_new("annotations", [annotation(i, generation=0) for i in range(5)])
    tagged = store.tag("annotations", gen_tag(0))
    assert store.tags("annotations") == {"gen-000": tagged}
    store.insert_new("annotations", [annotation(i, generation=1) for i in range(7)])
    assert store.count("annotations") == 12
    assert store.count("annotations", version="gen-000") == 5
    assert store.count("annotations", version=tagged) == 5
    assert store.read("annotations", ["generation"], version="gen-000").column("generation").to_pylist() == [0] * 5
    assert store.ids("annotations", where="generation = 1", version="gen-000") == set()
    assert store.version("annotations") > tagged
    # re-tagging the same version is a no-op; moving a tag is an error
    assert store.tag("annotations", "gen-000", tagged) == tagged
    with pytest.raises(ValueError, match="already points at version"):
        store.tag("annotations", "gen-000")


def test_compaction_drops_untagged_versions_but_keeps_tagged_ones_readable(store):
    for g in range(3):
        for part in range(2):  # two small commits per generation: something to compact
            store.insert_new("annotations", [annotation(part * 10 + i, generation=g) for i in range(4)])
        store.tag("annotations", gen_tag(g))
    store.append("rejects", [{"source": "s", "key": "k", "reason": "empty_text", "detail": ""}])
    tags = store.tags("annotations")
    before = store.versions("annotations")
    store.compact()
    after = store.versions("annotations")
    assert len(after) < len(before)
    assert set(tags.values()) <= set(after)
    for g in range(3):
        assert store.count("annotations", version=gen_tag(g)) == 8 * (g + 1)
        assert store.count_by("annotations", "generation", version=gen_tag(g)) == {k: 8 for k in range(g + 1)}
    assert store.count("annotations") == 24
    assert store.count_by("rejects", "reason") == {"empty_text": 1}
    # writes keep working after compaction
    assert store.insert_new("annotations", [annotation(99, generation=3)]) == 1
    assert store.count("annotations") == 25


def test_a_store_written_before_the_teacher_rename_is_refused_clearly(tmp_path):
    from cycle.errors import HQClipError

    old = Store(tmp_path / "lance")
    old.db.create_table("seed", schema=TEACHER)
    with pytest.raises(HQClipError, match="table named 'seed'.*rename .*seed.lance to teacher.lance"):
        old.count("teacher")


def test_batched_scan_helpers_answer_like_whole_reads(store):
    """`ids_at` + `rows_by_id` (a random sample without reading every row) pick what `random.sample` over
    the whole read picks; `count_by` over tiny batches counts what a group-by of the whole column does."""
    import random

    store.append(
        "samples", [{"id": f"s{i:02d}", "split": "train" if i % 3 else "val", "alt_text": f"t{i}"} for i in range(20)]
    )
    where = "split = 'train'"
    rows = store.read("samples", ["id", "alt_text"], where).to_pylist()
    for seed in (0, 1, 2):
        expected = random.Random(seed).sample(rows, 5)
        picked = store.ids_at("samples", random.Random(seed).sample(range(len(rows)), 5), where, batch_size=3)
        got = store.rows_by_id("samples", picked, ["id", "alt_text"], chunk=2)
        assert [got[i] for i in picked] == expected
    with pytest.raises(IndexError, match="past the 13 rows"):
        store.ids_at("samples", [13], where)
    assert store.rows_by_id("samples", ["s01", "absent"], ["id"], where="split = 'val'") == {}
    assert store.count_by("samples", "split", batch_size=3) == {"train": 13, "val": 7}


def test_compaction_indexes_the_keys_of_a_large_table(store, monkeypatch):
    for i in range(3):
        store.insert_new("annotations", [annotation(10 * i + k) for k in range(10)])
    store.compact()
    assert store.table("annotations").to_lance().describe_indices() == []  # small: a scan is as fast
    monkeypatch.setattr("cycle.store.KEY_INDEX_MIN_ROWS", 20)
    store.compact()
    (index,) = store.table("annotations").to_lance().describe_indices()
    assert list(index.field_names) == ["id"] and not store.index_keys("annotations")  # up to date: no commit
    assert store.insert_new("annotations", [annotation(5), annotation(99)]) == 1  # the index answers lookups
    assert store.index_keys("annotations")  # the new row taken in
    assert sorted(store.rows_by_id("annotations", ["img-005", "img-099", "img-100"], ["id"])) == ["img-005", "img-099"]
