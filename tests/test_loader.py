"""Torch loading from the store: pinned reads, joins, spawn workers, a deterministic resumable sampler."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from PIL import Image

from cycle.data.loader import PairDataset, ResumableSampler, collate_pairs, make_loader
from cycle.store import Store

N_TRAIN, N_VAL = 24, 6


def png(i: int, size: int = 16, mode: str = "RGB") -> bytes:
    color = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
    im = Image.new(mode, (size, size), color + ((128,) if mode == "RGBA" else ()))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def sample(i: int, split: str) -> dict:
    data = png(i)
    return {
        "id": f"s{i:03d}",
        "image": data,
        "alt_text": f"picture {i}",
        "source": "test",
        "split": split,
        "width": 16,
        "height": 16,
        "sha256": hashlib.sha256(data).hexdigest(),
        "meta": f'{{"i": {i}}}',
    }


def formulas(i: int, who: str) -> dict:
    return {
        "desc": [f"{who} desc {i}", "second"],
        "neg_desc": [f"{who} neg {i}", "other"],
        "tags": [f"{who}-tag-{i}"],
        "neg_tags": [f"{who}-neg-{i}"],
    }


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("loader") / "lance")
    rows = [sample(i, "train" if i < N_TRAIN else "val") for i in range(N_TRAIN + N_VAL)]
    store.append("samples", rows[::2])
    store.append("samples", rows[1::2])  # two fragments, interleaved ids: positions are not id order
    store.tag("samples", "gen-000")
    store.append("samples", [sample(99, "train")])  # after the tag: pinned readers must not see it
    # generation 1 annotates even ids; s004 failed; generation 2 annotates others (must not leak into 1)
    ann = [{"id": f"s{i:03d}", "generation": 1, **formulas(i, "gen1"), "status": "ok"} for i in range(0, N_TRAIN, 2)]
    ann[2]["status"] = "failed"
    store.insert_new("annotations", ann)
    store.insert_new(
        "annotations",
        [{"id": f"s{i:03d}", "generation": 2, **formulas(i, "gen2"), "status": "ok"} for i in range(N_TRAIN)],
    )
    store.tag("annotations", "gen-001", store.versions("annotations")[-2])
    store.insert_new("teacher", [{"id": f"s{i:03d}", **formulas(i, "seed"), "origin": "teacher"} for i in (0, 1, 2, 3)])
    return store.uri


def test_split_and_pinned_version(store_uri):
    latest = PairDataset(store_uri, split="train")
    pinned = PairDataset(store_uri, split="train", samples_version="gen-000")
    assert len(latest) == N_TRAIN + 1 and len(pinned) == N_TRAIN
    assert len(PairDataset(store_uri, split="val", samples_version="gen-000")) == N_VAL
    assert len(PairDataset(store_uri, split=None, samples_version="gen-000")) == N_TRAIN + N_VAL
    assert isinstance(pinned.pins["samples"], int)
    ids = {pinned[i]["id"] for i in range(len(pinned))}
    assert ids == {f"s{i:03d}" for i in range(N_TRAIN)}
    item = pinned[3]
    assert set(item) == {"id", "image", "alt_text"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    i = int(item["id"][1:])
    expected = torch.tensor([(37 * i) % 256, (91 * i) % 256, (151 * i) % 256], dtype=torch.float32) / 255
    assert torch.allclose(item["image"][:, 0, 0], expected)
    assert item["alt_text"] == f"picture {i}"


def test_join_annotations_of_one_generation_and_the_teacher(store_uri):
    ds = PairDataset(
        store_uri,
        samples_version="gen-000",
        annotations_version="gen-001",
        generation=1,
        use_teacher=True,
        extra_columns=["meta"],
    )
    by_id = {item["id"]: item for item in ds.__getitems__(list(range(len(ds))))}
    assert by_id["s006"]["annotated"] and by_id["s006"]["desc"] == ["gen1 desc 6", "second"]
    assert by_id["s006"]["text_source"] == "annotations" and by_id["s006"]["neg_tags"] == ["gen1-neg-6"]
    assert by_id["s006"]["meta"] == '{"i": 6}'
    # odd ids have no generation-1 annotation (generation 2's must not leak in)
    assert not by_id["s007"]["annotated"]
    assert by_id["s007"]["desc"] == [] and by_id["s007"]["tags"] == [] and by_id["s007"]["text_source"] == ""
    # the failed annotation counts as absent: the seed fills in
    assert by_id["s004"]["text_source"] == "" and not by_id["s004"]["annotated"]
    assert by_id["s001"]["text_source"] == "teacher" and by_id["s001"]["desc"][0] == "seed desc 1"
    assert by_id["s002"]["text_source"] == "annotations"
    seed_first = PairDataset(store_uri, samples_version="gen-000", generation=1, use_teacher=True, prefer="teacher")
    assert {it["id"]: it["text_source"] for it in seed_first.__getitems__(range(len(seed_first)))}["s002"] == "teacher"
    # only annotated rows: gen-1 even ids except the failed one, plus seed 1 and 3
    only = PairDataset(store_uri, samples_version="gen-000", generation=1, use_teacher=True, only_annotated=True)
    assert sorted(it["id"] for it in only.__getitems__(range(len(only)))) == sorted(
        [f"s{i:03d}" for i in range(0, N_TRAIN, 2) if i != 4] + ["s001", "s003"]
    )
    # the latest annotations version also has generation 2 for every train row
    gen2 = PairDataset(store_uri, samples_version="gen-000", generation=2)
    assert all(it["annotated"] for it in gen2.__getitems__(range(len(gen2))))


def test_bad_arguments_are_clear(store_uri, tmp_path):
    with pytest.raises(FileNotFoundError, match="no LanceDB store"):
        PairDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no version or tag"):
        PairDataset(store_uri, samples_version="gen-042")
    with pytest.raises(ValueError, match="without generation"):
        PairDataset(store_uri, annotations_version=1)
    with pytest.raises(ValueError, match="needs a join"):
        PairDataset(store_uri, only_annotated=True)
    with pytest.raises(IndexError):
        PairDataset(store_uri, samples_version="gen-000")[N_TRAIN]


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(100, seed=3, batch_size=10), ResumableSampler(100, seed=3, batch_size=10)
    first = [i for batch in a for i in batch]
    assert first == [i for batch in b for i in batch]
    assert sorted(first) == list(range(100))
    b.set_epoch(1)
    assert [i for batch in b for i in batch] != first
    assert [i for batch in ResumableSampler(100, seed=4, batch_size=10) for i in batch] != first
    # iterating on rolls over to the next epoch (same as set_epoch(1))
    c = ResumableSampler(100, seed=3, batch_size=10)
    c.set_epoch(1)
    assert list(a) == list(c)
    # drop_last: 3 full batches of 32 out of 100; without it a short fourth
    assert [len(x) for x in ResumableSampler(100, batch_size=32)] == [32, 32, 32]
    assert [len(x) for x in ResumableSampler(100, batch_size=32, drop_last=False)] == [32, 32, 32, 4]
    assert list(ResumableSampler(5, batch_size=2, shuffle=False, drop_last=False)) == [[0, 1], [2, 3], [4]]


def test_sampler_resumes_at_the_exact_next_sample():
    full = list(ResumableSampler(50, seed=7, batch_size=8, drop_last=False))
    run = ResumableSampler(50, seed=7, batch_size=8, drop_last=False)
    it = iter(run)
    taken = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state == {"epoch": 0, "position": 24}
    resumed = ResumableSampler(50, seed=7, batch_size=8, drop_last=False)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the epoch loop's usual call keeps the position
    assert taken + list(resumed) == full
    # a state saved right after the last batch resumes at the start of the next epoch
    assert resumed.state_dict() == {"epoch": 0, "position": 50}
    again = ResumableSampler(50, seed=7, batch_size=8, drop_last=False)
    again.load_state_dict(resumed.state_dict())
    nxt = ResumableSampler(50, seed=7, batch_size=8, drop_last=False)
    nxt.set_epoch(1)
    assert list(again) == list(nxt) and again.epoch == 1
    with pytest.raises(ValueError):
        again.load_state_dict({"epoch": 0, "position": 51})


def test_two_ranks_split_every_global_batch_contiguously():
    """Two ranks each read only their shard (rows 0-19, 20-39); together they see the global batches that
    one process with the same two shards sees."""
    single = list(ResumableSampler(40, seed=1, batch_size=8, shards=2))
    ranks = [ResumableSampler(40, seed=1, batch_size=8, rank=r, world_size=2) for r in range(2)]
    assert [r.owned_rows for r in ranks] == [(0, 20), (20, 40)]
    local = [list(r) for r in ranks]
    assert all(len(b) == 4 and 0 <= min(b) and max(b) < 20 for r in local for b in r)
    assert [r0 + [i + 20 for i in r1] for r0, r1 in zip(*local)] == single
    assert [i for b in single for i in b] == ResumableSampler(40, seed=1, batch_size=8, shards=2).order(0).tolist()
    assert sorted(i for b in single for i in b) == list(range(40))
    # 42 samples in 2 shards of 21 and batches of 2 x 4: 5 batches, 20 distinct rows of each shard an epoch
    odd = [i for b in ResumableSampler(42, seed=1, batch_size=8, shards=2) for i in b]
    assert len(set(odd)) == len(odd) == 40 and sum(i < 21 for i in odd) == 20 and max(odd) < 42
    # resumed mid-epoch at a global batch: the rest of the same batches
    resumed = ResumableSampler(40, seed=1, batch_size=8, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 0, "position": 16})
    assert list(resumed) == local[1][2:]
    with pytest.raises(ValueError, match="multiple of world_size"):
        ResumableSampler(40, batch_size=8, world_size=2, shards=3)
    with pytest.raises(ValueError, match="divide"):
        ResumableSampler(40, batch_size=9, world_size=2)
    with pytest.raises(ValueError, match="drop_last"):
        ResumableSampler(40, batch_size=8, world_size=2, rank=1, drop_last=False)


def test_loader_tracks_consumed_batches_not_prefetched_ones(store_uri):
    ds = PairDataset(store_uri, samples_version="gen-000")
    sampler = ResumableSampler(len(ds), seed=0, batch_size=4)
    loader = make_loader(ds, sampler=sampler)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    assert sampler.state_dict() == {"epoch": 0, "position": 8}
    assert first[0]["image"].shape == (4, 3, 16, 16) and len(first[0]["id"]) == 4
    resumed_sampler = ResumableSampler(len(ds), seed=0, batch_size=4)
    resumed_sampler.load_state_dict(sampler.state_dict())
    rest = [b["id"] for b in make_loader(ds, sampler=resumed_sampler)]
    order = [ds[i]["id"] for i in ResumableSampler(len(ds), seed=0, batch_size=4).order(0)]
    assert [i for b in first for i in b["id"]] + [i for b in rest for i in b] == order
    with pytest.raises(ValueError, match="fork"):
        make_loader(ds, sampler=sampler, multiprocessing_context="fork")
    with pytest.raises(ValueError, match="disagrees"):
        make_loader(ds, batch_size=5, sampler=sampler)


def test_cached_items_equal_fresh_reads_and_come_from_memory(store_uri, tmp_path):
    """`cache_bytes`: what a second epoch reads is the first one's items, served without the store (decoded
    images kept, transformed anew), up to the bound; a caller changing a served item changes nothing kept."""
    import shutil

    copy = tmp_path / "lance"
    shutil.copytree(store_uri, copy)
    common = dict(samples_version="gen-000", generation=1, use_teacher=True)
    image_bytes = 16 * 16 * 3  # decoded RGB pixels
    cached = PairDataset(str(copy), **common, cache_bytes=10 * image_bytes + 1)
    fresh = PairDataset(store_uri, **common)
    first = cached.__getitems__(range(N_TRAIN))
    first[0]["image"].zero_()
    first[0]["desc"].append("changed by the caller")
    shutil.rmtree(copy)  # from here on only what is kept can be served
    again = cached.__getitems__(range(10))
    for a, b in zip(again, fresh.__getitems__(range(10))):
        assert a.keys() == b.keys() and torch.equal(a["image"], b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert cached._cached_bytes == 10 * image_bytes  # the eleventh image would pass the bound
    with pytest.raises(OSError, match="Not found"):  # not kept: read from the deleted store
        cached.__getitems__([10])


@pytest.mark.slow
def test_spawn_workers_return_the_same_items_as_the_main_process(store_uri):
    ds = PairDataset(store_uri, samples_version="gen-000", generation=1, use_teacher=True)

    def run(workers: int):
        sampler = ResumableSampler(len(ds), seed=5, batch_size=6, drop_last=False)
        loader = make_loader(ds, sampler=sampler, num_workers=workers, prefetch_factor=2 if workers else None)
        it = iter(loader)
        batches = [next(it) for _ in range(2)]
        state = sampler.state_dict()  # two taken, however many the workers have prefetched
        batches += list(it)
        return batches, state

    (plain, plain_state), (spawned, spawned_state) = run(0), run(2)
    assert plain_state == spawned_state == {"epoch": 0, "position": 12}
    assert len(plain) == len(spawned) == 4
    for a, b in zip(plain, spawned):
        assert a["id"] == b["id"] and a["desc"] == b["desc"] and a["alt_text"] == b["alt_text"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["annotated"], b["annotated"])


def test_collate_keeps_texts_as_lists():
    items = [
        {"id": "a", "image": torch.zeros(3, 2, 2), "desc": ["x"], "annotated": True},
        {"id": "b", "image": torch.ones(3, 2, 2), "desc": [], "annotated": False},
    ]
    batch = collate_pairs(items)
    assert batch["image"].shape == (2, 3, 2, 2) and batch["id"] == ["a", "b"]
    assert batch["desc"] == [["x"], []] and batch["annotated"].tolist() == [True, False]
    mixed = collate_pairs([{"image": torch.zeros(3, 2, 2)}, {"image": torch.zeros(3, 4, 4)}])
    assert isinstance(mixed["image"], list)


def test_built_in_dataset_loads_with_its_seed(tiny_store, tiny_cfg):
    train = PairDataset(tiny_store.uri, split="train", use_teacher=True, extra_columns=["meta"])
    assert len(train) == tiny_cfg.data.emoji.n_train
    batch = collate_pairs(train.__getitems__(list(range(16))))
    size = tiny_cfg.data.emoji.image_size
    assert batch["image"].shape == (16, 3, size, size)
    seeded = PairDataset(tiny_store.uri, split="train", use_teacher=True, only_annotated=True)
    assert len(seeded) == tiny_store.count("teacher") > 0
    item = seeded[0]
    assert item["annotated"] and item["text_source"] == "teacher" and item["desc"] and item["tags"]
    assert len(PairDataset(tiny_store.uri, split="val")) == tiny_cfg.data.emoji.n_val
