"""emoji-scenes built into a real LanceDB store: splits, held-out guarantees, pixels, determinism, errors."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from itertools import combinations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_emoji_text import edit_kind

from cycle.config import ConfigError
from cycle.data.emoji import build_emoji_scenes
from cycle.data.emoji.facts import scene_facts, text_facts
from cycle.data.emoji.render import EmojiFontError
from cycle.data.emoji.scenes import scene_key
from cycle.data.emoji.vocab import load_vocab
from cycle.store import Store

SPLITS = ["train", "val", "test_zeroshot", "test_retrieval", "test_negatives", "test_compositional"]


@pytest.fixture(scope="module")
def rows(tiny_store):
    table = tiny_store.read("samples")
    out = table.to_pylist()
    for r in out:
        r["meta"] = json.loads(r["meta"])
    return out


@pytest.fixture(scope="module")
def vocab(tiny_cfg):
    return load_vocab(tiny_cfg.data.emoji.vocab_size)


def by_split(rows, *splits):
    return [r for r in rows if r["split"] in splits]


def test_splits_ids_and_counts(rows, tiny_cfg):
    c = tiny_cfg.data.emoji
    expected = {
        "train": c.n_train,
        "val": c.n_val,
        "test_zeroshot": c.vocab_size * c.n_test_zeroshot_per_object,
        "test_retrieval": c.n_test_retrieval,
        "test_negatives": c.n_test_negatives,
        "test_compositional": c.n_test_compositional,
    }
    assert {s: len(by_split(rows, s)) for s in SPLITS} == expected
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["id"].startswith(f"emoji-{r['split']}-") and r["source"] == "emoji-scenes" for r in rows)


def test_descriptions_match_scene_graphs(rows, vocab):
    for r in rows:
        meta = r["meta"]
        assert text_facts(meta["clean"], vocab) == scene_facts(meta["scene"]), meta["clean"]
        for caption in meta.get("captions", []):
            assert text_facts(caption, vocab) == scene_facts(meta["scene"])
        assert meta["alt_noise"] in (
            "none",
            "one_object",
            "wrong_count",
            "wrong_position",
            "sibling_name",
            "generic",
            "filename",
            "shop_spam",
        )
        if meta["alt_noise"] == "none":
            assert r["alt_text"] == meta["clean"]


def test_images_show_the_graph(rows, tiny_cfg):
    size = tiny_cfg.data.emoji.image_size
    for r in rows[::7]:
        image = Image.open(io.BytesIO(r["image"]))
        assert image.format == "PNG" and image.size == (size, size) == (r["width"], r["height"])
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        scene = r["meta"]["scene"]
        inside = np.zeros((size, size), bool)
        for obj in scene["objects"]:
            for x, y, side in obj["boxes"]:
                inside[y : y + side, x : x + side] = True
        off = np.abs(pixels - np.array(scene["rgb"])).sum(-1)
        assert (off[~inside] == 0).all()  # background exactly where no glyph is
        assert off[inside].mean() > 20  # glyphs drawn where the boxes say


def test_heldout_scenes_and_pairs_never_trained_on(rows):
    seen = by_split(rows, "train", "val")
    seen_keys = {scene_key(r["meta"]["scene"]) for r in seen}
    seen_pairs = {
        tuple(sorted((a["name"], b["name"]))) for r in seen for a, b in combinations(r["meta"]["scene"]["objects"], 2)
    }
    heldout = by_split(rows, "test_retrieval", "test_negatives", "test_compositional")
    keys = [scene_key(r["meta"]["scene"]) for r in heldout]
    assert len(set(keys)) == len(keys) and not set(keys) & seen_keys
    for r in by_split(rows, "test_compositional"):
        pairs = {tuple(p) for p in r["meta"]["heldout_pairs"]}
        assert pairs and not pairs & seen_pairs
        assert pairs == {
            tuple(sorted((a["name"], b["name"]))) for a, b in combinations(r["meta"]["scene"]["objects"], 2)
        }
    seen_images = {r["sha256"] for r in seen}
    assert not {r["sha256"] for r in heldout + by_split(rows, "test_zeroshot")} & seen_images


def test_negatives_differ_by_exactly_the_recorded_edit(rows, vocab):
    checked = 0
    for r in by_split(rows, "val", "test_negatives"):
        meta = r["meta"]
        positive = text_facts(meta["positive"], vocab)
        assert positive == scene_facts(meta["scene"])
        assert sorted(n["edit"] for n in meta["negatives"]) == ["count", "object", "relation"]
        for neg in meta["negatives"]:
            assert neg["text"] != meta["positive"]
            assert edit_kind(positive, text_facts(neg["text"], vocab)) == neg["edit"], neg
            checked += 1
    assert checked == 3 * 80


def test_seed_table(tiny_store, rows, tiny_cfg, vocab):
    seeds = tiny_store.read("teacher").to_pylist()
    train = {r["id"]: r for r in by_split(rows, "train")}
    assert len(seeds) == round(tiny_cfg.data.emoji.seed_share * len(train))
    for s in seeds:
        meta = train[s["id"]]["meta"]
        assert s["origin"] == "emoji-scenes:scene-graph" and s["desc"] == [meta["clean"]]
        edits = meta["seed_edits"]
        assert edit_kind(scene_facts(meta["scene"]), text_facts(s["neg_desc"], vocab)) == edits["neg_desc"][0]
        assert len(s["tags"]) == len(s["neg_tags"]) == len(edits["neg_tags"])
        assert all(t != n for t, n in zip(s["tags"], s["neg_tags"]))
    assert sum("seed_edits" in r["meta"] for r in train.values()) == len(seeds)


def test_zeroshot_covers_the_vocabulary(rows, vocab, tiny_cfg):
    zs = by_split(rows, "test_zeroshot")
    labels = [r["meta"]["label"] for r in zs]
    assert set(labels) == set(vocab.names)
    assert all(labels.count(n) == tiny_cfg.data.emoji.n_test_zeroshot_per_object for n in vocab.names)
    for r in zs:
        (obj,) = r["meta"]["scene"]["objects"]
        assert obj["name"] == r["meta"]["label"] and obj["count"] == 1 and r["meta"]["scene"]["plain"]


def digest(store):
    samples = store.read("samples", ["id", "sha256", "alt_text", "split", "meta"]).to_pylist()
    seeds = store.read("teacher").to_pylist()
    return sorted(samples, key=lambda r: r["id"]), sorted(seeds, key=lambda r: r["id"])


def test_same_seed_same_bytes_idempotent_and_guarded(tmp_path, tiny_cfg, tiny_store):
    cfg = tiny_cfg.data.emoji
    store = Store(tmp_path / "lance")
    counts = build_emoji_scenes(cfg, store, progress=False)
    assert digest(store) == digest(tiny_store)
    versions = (store.versions("samples"), store.versions("teacher"))
    assert build_emoji_scenes(cfg, store, progress=False) == counts  # again: nothing to do, no new version
    assert (store.versions("samples"), store.versions("teacher")) == versions
    with pytest.raises(ConfigError, match="another config"):
        build_emoji_scenes(replace(cfg, seed=cfg.seed + 1), store, progress=False)
    assert digest(store) == digest(tiny_store)


def test_resume_finishes_a_partial_build(tmp_path, tiny_cfg, tiny_store):
    store = Store(tmp_path / "lance")
    full = tiny_store.read("samples").to_pylist()
    store.insert_new("samples", full[: len(full) // 3])  # as if interrupted after the first batch
    build_emoji_scenes(tiny_cfg.data.emoji, store, progress=False, write_batch=64)
    assert digest(store) == digest(tiny_store)


def test_missing_or_bad_font_is_a_clear_error_and_writes_nothing(tmp_path, tiny_cfg):
    store = Store(tmp_path / "lance")
    with pytest.raises(EmojiFontError, match="fonts-noto-color-emoji.*data.emoji.font"):
        build_emoji_scenes(replace(tiny_cfg.data.emoji, font=str(tmp_path / "none.ttf")), store, progress=False)
    not_a_font = tmp_path / "font.ttf"
    not_a_font.write_text("not a font")
    with pytest.raises(EmojiFontError, match="cannot use"):
        build_emoji_scenes(replace(tiny_cfg.data.emoji, font=str(not_a_font)), store, progress=False)
    assert store.count("samples") == 0 and store.count("teacher") == 0


def test_cli_builds_into_run_dir(tmp_path):
    from cycle.cli import main

    args = [
        "data",
        "build",
        "emoji-scenes",
        "--out",
        str(tmp_path / "run"),
        "data.emoji.vocab_size=12",
        "data.emoji.n_train=30",
        "data.emoji.n_val=6",
        "data.emoji.n_test_retrieval=6",
        "data.emoji.n_test_negatives=6",
        "data.emoji.n_test_compositional=4",
        "data.emoji.image_size=32",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "test_compositional" in result.output and Store(tmp_path / "run" / "lance").count("samples") == 76
    bad = CliRunner().invoke(main, [*args, "data.emoji.seed=5"])
    assert bad.exit_code == 2 and "another config" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(main, [*args[:4], str(tmp_path / "other"), "data.emoji.font=/no/such.ttf"])
    assert bad.exit_code == 2 and "fonts-noto-color-emoji" in bad.output
