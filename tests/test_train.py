"""The CLIP trainer: texts per sample, feature-cache accumulation, DeepSpeed runs (resume after SIGKILL,
two ranks against one), generation 0, and every bad input it refuses."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import decode_tokens
from safetensors.torch import load_file

from cycle.clip.text import TextDrawer, build_tag_vocab, multi_hot, normalise_tag
from cycle.config import LossConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
N_TRAIN = 64
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ["circle", "square"]
# 64 samples, batch 16, 6 epochs: 24 steps; checkpoints every 4; feature-cache accumulation (micro 8).
RUN_OVERRIDES = [
    "clip.name=hqclip-micro",
    "train.batch_size=16",
    "train.micro_batch_size=8",
    "train.epochs=6",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.warmup_steps=3",
    "loss.stc_min_count=1",
]


# ----------------------------------------------------------------------------------------------- data
def _png(color: str, shape: str, background) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32), background)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)([6, 6, 26, 26], fill=COLORS[color])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _annotation(i: int, color: str, shape: str) -> dict:
    other = list(COLORS)[(list(COLORS).index(color) + 1) % 4]
    desc = [
        f"the image shows a {color} {shape}.",
        f"the {shape} is in the middle of a dark background.",
        f"there is exactly one {shape} in this {color} picture with nothing else around it.",
    ]
    neg = [
        f"the image shows a {other} {shape}.",
        f"the {shape} is in the corner of a dark background.",
        f"there are exactly two {shape}s in this {other} picture with nothing else around it.",
    ]
    tags, neg_tags = [f"{color} {shape}s", color, "dark background"], [f"{other} {shape}", other, "bright background"]
    if i == 6:  # a broken annotation whose negatives equal its positives: no usable negative
        neg, neg_tags = desc, tags
    return dict(
        id=f"s{i:03d}",
        generation=1,
        desc=desc,
        neg_desc=neg,
        tags=tags,
        neg_tags=neg_tags,
        raw_output="",
        status="failed" if i == 5 else "ok",
        reason="",
        attempts=1,
        annotator="test",
        prompt_hash="",
        score=None,
    )


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory):
    """64 train + 8 val coloured shapes; generation-1 annotations for 3 in 4 train rows (one failed)."""
    from cycle.store import Store

    store = Store(tmp_path_factory.mktemp("train-store") / "lance")
    rng = np.random.default_rng(0)
    samples, annotations = [], []
    for i in range(N_TRAIN + 8):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
        background = tuple(int(v) for v in rng.integers(0, 60, 3))
        split = "train" if i < N_TRAIN else "val"
        samples.append(
            dict(
                id=f"s{i:03d}",
                image=_png(color, shape, background),
                source="test",
                split=split,
                alt_text=["pic", f"{color} thing", f"IMG_{i}.png"][i % 3],
                width=32,
                height=32,
                sha256=str(i),
                meta=None,
            )
        )
        if split == "train" and i % 4 != 3:
            annotations.append(_annotation(i, color, shape))
    store.append("samples", samples)
    store.insert_new("annotations", annotations)
    return store


def _cfg(*extra: str):
    return load_config(TINY_YAML, ["name=train-test", *RUN_OVERRIDES, *extra])


def _versions(store):
    return store.table("samples").version, store.table("annotations").version


@pytest.fixture
def one_thread():
    """Runs compared bit for bit use the same thread count as the subprocesses they are compared with."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _log(out: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r], [r for r in lines if "event" in r]


def _weights(model_dir: Path) -> dict:
    out = {f"clip.{k}": v for k, v in load_file(model_dir / "open_clip_model.safetensors").items()}
    if (model_dir / "stc_head.safetensors").is_file():
        out.update({f"stc.{k}": v for k, v in load_file(model_dir / "stc_head.safetensors").items()})
    return out


@pytest.fixture(scope="module")
def reference_run(pair_store, tmp_path_factory):
    """Generation 1, one rank, in this process, uninterrupted: what the other runs must reproduce."""
    from cycle.clip.train import train_clip

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference") / "clip"
        samples, annotations = _versions(pair_store)
        model_dir = train_clip(
            _cfg(), pair_store.uri, out, samples, annotations_version=annotations, generation=1, progress=False
        )
    finally:
        torch.set_num_threads(before)
    return out, model_dir


# ------------------------------------------------------------------------------------ texts per sample
def _text_batch(n=4, **overrides):
    desc = [f"the image shows a big red apple number {k} sitting on a wooden table near the window." for k in range(8)]
    neg = [s.replace("red", "green") for s in desc]
    batch = {
        "id": [f"s{i}" for i in range(n)],
        "alt_text": [f"alt {i}" for i in range(n)],
        "desc": [desc] * n,
        "neg_desc": [neg] * n,
        "tags": [["Red Apples", "table"]] * n,
        "neg_tags": [["green apple", "chair"]] * n,
        "annotated": [True] * n,
    }
    batch.update(overrides)
    return batch


def test_long_descriptions_fit_the_context_by_whole_aligned_sentences(tokenizer):
    cfg = replace(LossConfig(), long_text_prob=1.0, neg_tags_prob=0.0)
    out = TextDrawer(cfg, tokenizer, seed=3)(_text_batch(), step=0)
    assert out["stats"]["truncated"] == 0 and out["stats"]["long_text"] == 4
    for pos_row, neg_row in zip(out["texts"], out["neg_texts"]):
        assert int(pos_row[-1]) == 0  # fits with room to spare: nothing cut
        pos, neg = decode_tokens(tokenizer, pos_row), decode_tokens(tokenizer, neg_row)
        numbers = [int(k) for k in re.findall(r"number (\d+)", pos)]
        assert 1 <= len(numbers) < 8 and numbers == sorted(numbers)  # a subset of whole sentences, in order
        assert neg == pos.replace("red", "green")  # the negative uses the same sentences
    assert bool(out["neg_valid"].all())


def test_draws_depend_on_seed_step_and_id_only(tokenizer):
    cfg = replace(LossConfig(), long_text_prob=0.5, neg_tags_prob=0.5)
    drawer = TextDrawer(cfg, tokenizer, seed=1, tag_vocab=["red apple", "table"])
    whole = drawer(_text_batch(n=8), step=5)
    halves = [drawer({k: v[i : i + 4] for k, v in _text_batch(n=8).items()}, step=5) for i in (0, 4)]
    for key in ("texts", "neg_texts", "neg_valid", "tag_targets"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))  # as one rank or as two
    assert not torch.equal(whole["texts"], drawer(_text_batch(n=8), step=6)["texts"])


def test_cached_token_rows_are_the_tokenizers(tokenizer):
    drawer = TextDrawer(LossConfig(), tokenizer, context_length=16)
    first, again = ["a red apple.", "IMG_2041.png", "a red apple."], ["IMG_2041.png", "two tables", "a red apple."]
    for texts in (first, again):  # uncached, then partly cached rows
        assert torch.equal(drawer.tokenize(texts), tokenizer(texts, context_length=16))
    assert set(drawer.token_rows) == {"a red apple.", "IMG_2041.png", "two tables"}


def test_alt_text_only_without_annotation_or_in_generation_0(tokenizer):
    cfg = replace(LossConfig(), long_text_prob=1.0)
    batch = _text_batch(annotated=[True, False, True, False])
    out = TextDrawer(cfg, tokenizer)(batch, step=0)
    assert decode_tokens(tokenizer, out["texts"][1]) == "alt 1"
    assert out["neg_valid"].tolist() == [True, False, True, False]
    assert "tag_targets" not in out  # no vocabulary given: STC off
    gen0 = TextDrawer(cfg, tokenizer, use_annotations=False, tag_vocab=["table"])(batch, step=0)
    assert [decode_tokens(tokenizer, r) for r in gen0["texts"]] == [f"alt {i}" for i in range(4)]
    assert "neg_texts" not in gen0 and "tag_targets" not in gen0


def test_a_negative_identical_to_its_positive_is_dropped(tokenizer):
    cfg = replace(LossConfig(), long_text_prob=1.0, neg_tags_prob=0.0)
    same = _text_batch(n=2)
    same["neg_desc"] = same["desc"]
    out = TextDrawer(cfg, tokenizer)(same, step=0)
    assert not bool(out["neg_valid"].any()) and out["stats"]["neg_same_as_pos"] == 2


def test_what_cannot_fit_is_counted_not_silently_cut(tokenizer):
    long_sentence = " ".join(["word"] * 120) + "."
    batch = _text_batch(n=2, desc=[[long_sentence]] * 2, neg_desc=[[long_sentence.replace("word", "term")]] * 2)
    # (no edit-distance bound: the 120-word "edit" would otherwise be refused as no minimal edit)
    cfg = replace(LossConfig(), long_text_prob=1.0, neg_tags_prob=0.0, neg_max_edit_words=0)
    out = TextDrawer(cfg, tokenizer)(batch, step=0)
    assert out["stats"]["truncated"] == 4  # two positives and two negatives were cut by the tokenizer
    trunc = TextDrawer(replace(LossConfig(), long_text_prob=1.0, text_fit="truncate"), tokenizer)(_text_batch(n=1), 0)
    assert trunc["stats"]["truncated"] >= 1 and "number 0" in decode_tokens(tokenizer, trunc["texts"][0])


def test_tag_vocabulary_and_multi_hot_targets():
    assert normalise_tag("  Red   Apples. ") == "red apple"
    assert [normalise_tag(t) for t in ("boxes", "berries", "glass", "bus", "cactus")] == [
        "box",
        "berry",
        "glass",
        "bus",
        "cactus",
    ]
    lists = [["Red Apples", "box"], ["red apple", "boxes", "cat"], ["cats", "red apple", "dog"], []]
    assert build_tag_vocab(lists, size=10, min_count=2) == ["red apple", "box", "cat"]
    assert build_tag_vocab(lists, size=2, min_count=1) == ["red apple", "box"]
    targets = multi_hot([["Boxes", "unknown"], []], {"red apple": 0, "box": 1})
    assert targets.tolist() == [[0.0, 1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="size"):
        build_tag_vocab(lists, size=0)


# ------------------------------------------------------------------------------------ accumulation
def test_feature_cache_accumulation_gives_the_full_batch_gradients(tokenizer, one_thread):
    from cycle.clip.loss import HQClipLoss
    from cycle.clip.model import ClipWithTagHead, create_clip
    from cycle.clip.trainer import forward_backward, split_micro_batches

    torch.manual_seed(0)
    clip, _, _, tok = create_clip("hqclip-micro")
    # float64 towers: the two orders of summation then agree to ~1e-15, so a real difference cannot hide in
    # float32 rounding (which alone reaches ~2e-6 of the largest gradient on some draws)
    module = ClipWithTagHead(clip, num_tags=3).double()
    drawer = TextDrawer(replace(LossConfig(), long_text_prob=0.5), tok, tag_vocab=["red apple", "table", "chair"])
    inputs = drawer(_text_batch(n=8, annotated=[True] * 6 + [False] * 2), step=0)
    inputs.pop("stats")
    inputs["images"] = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_fn = HQClipLoss(replace(LossConfig(), hni_weight=0.5, stc_weight=0.5))

    def grads(micro):
        module.zero_grad(set_to_none=True)
        losses = forward_backward(module, loss_fn, split_micro_batches(inputs, micro), lambda loss: loss.backward())
        return losses, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    full_losses, full = grads(8)
    acc_losses, acc = grads(2)
    assert set(full) == set(acc) and len(full) == len(list(module.parameters()))
    for name in full:
        assert float((full[name] - acc[name]).abs().max()) <= 1e-10 * float(full[name].abs().max()) + 1e-12, name
    for name in full_losses:
        assert acc_losses[name].item() == pytest.approx(full_losses[name].item(), abs=1e-6)


# ------------------------------------------------------------------------------------ DeepSpeed runs
def test_reference_run_writes_model_vocab_and_log(reference_run):
    out, model_dir = reference_run
    from cycle.clip.saved import load_clip

    clip, _, _, extras = load_clip(model_dir)
    assert extras["tag_vocab"][0] == "dark background" and len(extras["tag_vocab"]) == 10
    assert extras["stc_head"]["weight"].shape == (10, 64)
    assert float(clip.logit_scale.detach().exp()) <= 100.0 + 1e-4
    steps, events = _log(out)
    assert [r["step"] for r in steps] == list(range(1, 25))
    assert events[0]["plan"]["accum_steps"] == 2 and events[0]["stc_weight"] == 1.0
    assert {"clip_loss", "hni_loss", "stc_loss", "lr", "samples_per_s", "logit_scale"} <= set(steps[0])
    assert {"neg_identical_share", "neg_dropped_share", "short_text_share"} <= set(steps[0])
    # per generation: row s006's negatives equal its positives (3 + 3 of the 47 usable rows' 282 parts)
    assert events[0]["negatives"]["identical_negative_share"] == pytest.approx(6 / 282)
    assert events[0]["stc_head"] == "cosine" and set(extras["stc_head"]) == {"weight", "bias", "logit_scale"}
    assert steps[-1]["clip_loss"] < steps[0]["clip_loss"]
    assert max(r["lr"] for r in steps) == pytest.approx(5e-4) and steps[-1]["lr"] < 1e-5  # warmup, cosine


@pytest.mark.slow
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(pair_store, reference_run, tmp_path, one_thread):
    from cycle.clip.train import train_clip

    out = tmp_path / "clip"
    samples, annotations = _versions(pair_store)
    cmd = [
        sys.executable,
        "-m",
        "cycle.cli",
        "train",
        str(out),
        "--store",
        pair_store.uri,
        "--config",
        str(TINY_YAML),
        "--generation",
        "1",
        "--samples-version",
        str(samples),
        "--annotations-version",
        str(annotations),
        "--no-progress",
        "name=train-test",
        *RUN_OVERRIDES,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert not (out / "model").exists()  # killed mid-run

    model_dir = train_clip(
        _cfg(), pair_store.uri, out, samples, annotations_version=annotations, generation=1, progress=False
    )
    steps, events = _log(out)
    resumed_at = [e["step"] for e in events if e["event"] == "resume"]
    assert len(resumed_at) == 1 and 0 < resumed_at[0] < 24
    assert [r["step"] for r in steps] == list(range(1, 25))  # no step lost, none twice
    ref, got = _weights(reference_run[1]), _weights(model_dir)
    assert set(ref) == set(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name  # bitwise
    assert not list((out / "checkpoints").glob("tmp-*"))


# 2 ranks x 8 samples, each in micro-batches of 4: gather across ranks and feature cache together; 8 steps.
TWO_RANKS = ("train.world_size=2", "train.micro_batch_size=4", "train.epochs=2")


@pytest.fixture(scope="module")
def spawned_two_ranks(pair_store, tmp_path_factory):
    """Two ranks spawned on this machine, each reading only its own 32 of the 64 train rows."""
    from cycle.clip.train import train_clip

    samples, annotations = _versions(pair_store)
    out = tmp_path_factory.mktemp("two-ranks") / "clip"
    model_dir = train_clip(
        _cfg(*TWO_RANKS), pair_store.uri, out, samples, annotations_version=annotations, generation=1, progress=False
    )
    return out, model_dir


def _assert_same_run(ref_out: Path, out: Path, steps: int) -> None:
    """Per-step loss terms within 1e-5 and final weights within 1e-4: the tolerance of a changed reduction order."""
    ref_steps, _ = _log(ref_out)
    got_steps, _ = _log(out)
    assert len(got_steps) == len(ref_steps) == steps
    for a, b in zip(ref_steps, got_steps):
        for term in ("clip_loss", "hni_loss", "stc_loss"):
            assert b[term] == pytest.approx(a[term], abs=1e-5), (a["step"], term)
    ref, got = _weights(ref_out / "model"), _weights(out / "model")
    assert set(ref) == set(got)
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-4


@pytest.mark.slow
def test_two_ranks_give_the_losses_and_weights_of_one_rank(pair_store, spawned_two_ranks, tmp_path, one_thread):
    """One process reading both shards sees the two ranks' global batches: it must end where they end
    (the all-gather, the loss and the feature cache do not depend on the world size)."""
    from cycle.clip.dist import launch
    from cycle.clip.train import prepare
    from cycle.clip.trainer import train_rank

    samples, annotations = _versions(pair_store)
    single = _cfg("train.micro_batch_size=4", "train.epochs=2")
    job = prepare(single, pair_store.uri, tmp_path / "clip", samples, annotations, generation=1, progress=False)
    job.plan.shards = 2  # the two ranks' shards, read by one rank
    launch(train_rank, 1, job)
    _assert_same_run(spawned_two_ranks[0], tmp_path / "clip", 8)


@pytest.mark.slow
def test_multinode_torchrun_two_nodes_train_to_the_spawned_two_rank_weights(pair_store, spawned_two_ranks, tmp_path):
    """Two "nodes" of one rank each (`torchrun --nnodes 2 --node-rank r`, a static rendezvous on loopback,
    gloo): each runs `hqclip train`, joins the group from the environment instead of spawning, reads its
    own shard, and together they train what two spawned ranks train."""
    samples, annotations = _versions(pair_store)
    out = tmp_path / "clip"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # what each node's rank gets from its launcher; our own rank variables must not leak in
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    nodes = []
    for node_rank in range(2):
        cmd = [
            *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
            *("--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)),
            *("-m", "cycle.cli", "train", str(out), "--store", pair_store.uri, "--config", str(TINY_YAML)),
            *("--generation", "1", "--samples-version", str(samples), "--annotations-version", str(annotations)),
            *("--no-progress", "name=train-test", *RUN_OVERRIDES, *TWO_RANKS),
        ]
        nodes.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        outputs = [node.communicate(timeout=300)[0].decode() for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    _assert_same_run(spawned_two_ranks[0], out, 8)
    assert _log(out)[1][0]["plan"]["shards"] == 2


@pytest.mark.slow
def test_multinode_ray_train_two_workers_train_to_the_spawned_two_rank_weights(pair_store, spawned_two_ranks, tmp_path):
    """`cluster.executor: ray`: two Ray Train workers (a local Ray of 2 CPUs, gloo) run the same DeepSpeed
    rank in Ray's process group, each reading its own shard, and end where two spawned ranks end."""
    import ray

    from cycle.clip.train import train_clip

    samples, annotations = _versions(pair_store)
    out = tmp_path / "clip"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        train_clip(
            _cfg(*TWO_RANKS, "cluster.executor=ray"),
            pair_store.uri,
            out,
            samples,
            annotations_version=annotations,
            generation=1,
            progress=False,
        )
    finally:
        ray.shutdown()
    _assert_same_run(spawned_two_ranks[0], out, 8)


def _one_epoch_from_reference(pair_store, reference_run, out, *overrides, generation=None):
    """One epoch started from the reference run's CLIP (the controller's clip.init=previous); generation None:
    alt-text only, else that generation's annotations."""
    from cycle.clip.train import train_clip

    samples, annotations = _versions(pair_store)
    return train_clip(
        _cfg("train.epochs=1", *overrides),
        pair_store.uri,
        out,
        samples,
        annotations_version=annotations if generation else None,
        generation=generation,
        init_clip=reference_run[1],
        progress=False,
    )


def test_generation_0_trains_on_alt_text_without_hni_or_stc(pair_store, reference_run, tmp_path):
    # Started from a trained CLIP: its first loss is already low.
    model_dir = _one_epoch_from_reference(pair_store, reference_run, tmp_path / "clip", "train.micro_batch_size=0")
    steps, events = _log(tmp_path / "clip")
    assert events[0]["hni_weight"] == 0.0 and events[0]["stc_weight"] == 0.0
    assert len(steps) == 4 and "hni_loss" not in steps[0] and "stc_loss" not in steps[0]
    assert all(r["long_text_share"] == 0.0 for r in steps)
    # below chance level of a batch of 16 (a fresh CLIP starts at or above it); the reference run trains on
    # alt-text in half its rows, without HNI there since issue 10 (alt-text has no paired negative)
    assert steps[0]["clip_loss"] < 0.95 * np.log(16)
    assert not (model_dir / "stc_head.safetensors").exists() and not (model_dir / "tag_vocab.json").exists()


@pytest.mark.slow
def test_a_text_head_is_saved_as_the_cosine_head_it_computes(pair_store, reference_run, tmp_path):
    from cycle.clip.model import encode_text
    from cycle.clip.saved import load_clip

    model_dir = _one_epoch_from_reference(
        pair_store, reference_run, tmp_path / "clip", "loss.stc_head=text", generation=1
    )
    steps, events = _log(tmp_path / "clip")
    assert events[0]["stc_head"] == "text" and all(r["stc_loss"] > 0 for r in steps)
    clip, _, tokenizer, extras = load_clip(model_dir)
    head, vocab = extras["stc_head"], extras["tag_vocab"]
    assert set(head) == {"weight", "bias", "logit_scale"} and head["weight"].shape == (len(vocab), 64)
    with torch.no_grad():
        assert torch.allclose(head["weight"], encode_text(clip, tokenizer(vocab)), atol=1e-5)


def test_prepare_carries_the_previous_head_over(pair_store, reference_run, tmp_path):
    from cycle.clip.train import TrainInputError, prepare

    samples, annotations = _versions(pair_store)
    common = dict(annotations_version=annotations, generation=1, progress=False)
    job = prepare(_cfg(), pair_store.uri, tmp_path / "a", samples, init_clip=reference_run[1], **common)
    head = job.stc_head_init
    assert head["from"] == str(reference_run[1]) and head["tag_vocab"] == job.tag_vocab
    assert head["state"]["weight"].shape == (10, 64) and "10 of 10 tags" in job.notes[-1]
    # given apart from the initial CLIP (clip.init=scratch): the same rows, the CLIP itself fresh
    job = prepare(_cfg(), pair_store.uri, tmp_path / "b", samples, stc_head_from=reference_run[1], **common)
    assert job.init_clip is None and job.stc_head_init["from"] == str(reference_run[1])
    assert sum(job.tag_prior) / len(job.tag_prior) == pytest.approx(job.tag_positive_rate)
    with pytest.raises(TrainInputError, match="stc_head_from"):
        prepare(_cfg(), pair_store.uri, tmp_path / "c", samples, stc_head_from=tmp_path / "none", **common)
    # a CLIP without a head (generation 0's) carries nothing
    assert prepare(_cfg(), pair_store.uri, tmp_path / "d", samples, **common).stc_head_init is None


def test_seed_texts_teacher_trains_seed_images_on_the_teachers_annotation(pair_store, tmp_path):
    """`loss.seed_texts: teacher`: an image with a teacher row trains on the teacher's formulas, the others on the
    annotator's; by default the teacher row is only the fallback of an image without a usable annotation. The
    STC vocabulary and negative shares count what training reads."""
    from cycle.clip.train import prepare
    from cycle.data.loader import PairDataset
    from cycle.store import Store

    store = Store(shutil.copytree(Path(pair_store.uri), tmp_path / "lance"))
    teacher = {"desc": ["the teacher's sentence."], "neg_desc": ["the teacher's edit."]}
    formulas = dict(teacher, tags=["teacher tag"], neg_tags=["edited tag"], origin="test")
    store.insert_new("teacher", [dict(id=i, **formulas) for i in ("s000", "s003")])
    samples, annotations = _versions(store)
    common = dict(annotations_version=annotations, generation=1, teacher_version=store.table("teacher").version)

    def read(job) -> dict:
        return {it["id"]: (it["desc"], it["text_source"]) for it in PairDataset(**job.data).__getitems__(range(4))}

    by_default = prepare(_cfg(), store.uri, tmp_path / "a", samples, progress=False, **common)
    seeds_first = prepare(_cfg("loss.seed_texts=teacher"), store.uri, tmp_path / "b", samples, progress=False, **common)
    annotator = _annotation(0, "red", "circle")["desc"]
    assert read(by_default)["s000"] == (annotator, "annotations")
    assert read(seeds_first)["s000"] == (teacher["desc"], "teacher")
    for job in (by_default, seeds_first):  # s001 has only its annotation, s003 only its teacher row
        assert read(job)["s001"][1] == "annotations" and read(job)["s003"] == (teacher["desc"], "teacher")
    # of the rows training reads, s000 swaps its 3 sentences + 3 tags for the teacher's 1 + 1
    assert by_default.negative_stats["negative_parts"] - seeds_first.negative_stats["negative_parts"] == 4
    assert "teacher tag" in seeds_first.tag_vocab


def test_mined_negatives_index_the_sentences_training_reads(pair_store, tmp_path, tokenizer, monkeypatch):
    """`loss.hni_negatives: mined`: `prepare` indexes the train rows' descriptions, and a row's negative is
    another image's description one word away ("a red circle" -> "a blue circle"), drawn by the text drawer."""
    from cycle.clip.negatives import word_edit_distance, words_of
    from cycle.clip.text import TextDrawer
    from cycle.clip.train import TrainInputError, prepare
    from cycle.data.loader import PairDataset, collate_pairs

    samples, annotations = _versions(pair_store)
    cfg = _cfg("loss.hni_negatives=mined", "loss.long_text_prob=1")
    job = prepare(cfg, pair_store.uri, tmp_path, samples, annotations, generation=1, progress=False)
    paired = prepare(_cfg(), pair_store.uri, tmp_path / "p", samples, annotations, generation=1, progress=False)
    assert paired.neighbours == {}
    monkeypatch.setattr("cycle.clip.negatives.MINED_MAX_SENTENCES", 3)  # a corpus past what one job may index
    with pytest.raises(TrainInputError, match=r"^loss.hni_negatives=mined: mined negatives index at most 3 distinct"):
        prepare(cfg, pair_store.uri, tmp_path / "big", samples, annotations, generation=1, progress=False)
    monkeypatch.undo()
    red = _annotation(0, "red", "circle")["desc"][0]
    assert job.neighbours[red] and all(word_edit_distance(red, n) == 1 for n in job.neighbours[red])
    assert "the image shows a red square." in job.neighbours[red]
    assert any(n.startswith("mined negatives:") for n in job.notes)
    batch = collate_pairs(PairDataset(**job.data).__getitems__(range(8)))
    out = TextDrawer(cfg.loss, tokenizer, neighbours=job.neighbours)(batch, step=0)
    indexed = {words_of(s) for s in job.neighbours}
    assert out["neg_valid"].sum() >= 4  # every annotated row's sentences have neighbours
    for i in range(8):
        if out["neg_valid"][i]:  # every sentence of the negative is a training sentence, not an annotator's edit
            parts = [p for p in decode_tokens(tokenizer, out["neg_texts"][i]).split(".") if p.strip()]
            assert all(words_of(p) in indexed for p in parts), parts


# ------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.world_size=3"], "train.batch_size"),
        (["train.world_size=0"], "train.world_size"),
        (["train.micro_batch_size=5"], "train.micro_batch_size"),
        (["train.micro_batch_size=-8"], "train.micro_batch_size"),
        (["train.zero_stage=3"], "train.zero_stage"),
        (["train.log_every=0"], "train.log_every"),
    ],
)
def test_bad_sizes_are_refused_by_config_validation(overrides, message):
    from cycle.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_fewer_samples_than_a_batch_is_refused_before_anything_starts(pair_store, tmp_path):
    from cycle.clip.train import TrainInputError, train_clip

    with pytest.raises(TrainInputError, match="fewer than one batch"):
        train_clip(
            _cfg("train.batch_size=128", "train.micro_batch_size=0"),
            pair_store.uri,
            tmp_path / "clip",
            _versions(pair_store)[0],
            progress=False,
        )
    assert not (tmp_path / "clip" / "checkpoints").exists()


def test_a_generation_without_annotations_is_refused(pair_store, tmp_path):
    from cycle.clip.train import TrainInputError, train_clip

    samples, annotations = _versions(pair_store)
    with pytest.raises(TrainInputError, match="generation 2 has no usable annotations"):
        train_clip(_cfg(), pair_store.uri, tmp_path / "clip", samples, annotations_version=annotations, generation=2)


def test_resuming_into_another_runs_directory_is_refused(pair_store, reference_run):
    from cycle.clip.checkpoint import ResumeError
    from cycle.clip.train import train_clip
    from cycle.errors import HQClipError

    assert issubclass(ResumeError, HQClipError)

    samples, annotations = _versions(pair_store)
    before = (reference_run[0] / "checkpoints" / "run.json").read_text()
    with pytest.raises(ResumeError, match="train.lr"):
        train_clip(
            _cfg("train.lr=0.001"),
            pair_store.uri,
            reference_run[0],
            samples,
            annotations_version=annotations,
            generation=1,
        )
    assert (reference_run[0] / "checkpoints" / "run.json").read_text() == before


class _Payload:
    """A pickle that, once loaded by an unrestricted unpickler, creates `marker`: what an attacker would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(
    "planted", ["rng-rank0.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_resume_never_unpickles_objects_from_the_run_folder(pair_store, reference_run, tmp_path, planted):
    from cycle.clip.checkpoint import ResumeError
    from cycle.clip.train import train_clip

    out = tmp_path / "clip"
    shutil.copytree(reference_run[0] / "checkpoints", out / "checkpoints")
    tag = (out / "checkpoints" / "latest").read_text().strip()
    target = out / "checkpoints" / tag / planted
    assert target.is_file()  # a file the resume really reads
    torch.save(_Payload(tmp_path / "proof"), tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()  # the payload works against an unrestricted load
    marker = tmp_path / "marker"
    torch.save(_Payload(marker), target)

    samples, annotations = _versions(pair_store)
    with pytest.raises(ResumeError, match=f"{planted}.*refused"):
        train_clip(_cfg(), pair_store.uri, out, samples, annotations_version=annotations, generation=1, progress=False)
    assert not marker.exists()
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------------ collectives
def _collective_worker(rank: int, port: int, device: str, queue) -> None:
    """One of two gloo ranks: a loss step, its logged terms and the text counts, every collective recorded."""
    from collections import Counter

    import torch.distributed as tdist

    from cycle.clip.loss import HQClipLoss, reduce_for_logging
    from cycle.clip.trainer import text_counts

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = []

    def recorded(collective):
        def call(first, *args, **kwargs):  # all_reduce(tensor) / all_gather(tensor_list, tensor)
            tensors = (list(first) if isinstance(first, list) else [first]) + [a for a in args if torch.is_tensor(a)]
            seen.extend((collective.__name__, str(t.device), str(t.dtype)) for t in tensors)
            return collective(first, *args, **kwargs)  # the real collective still runs

        return call

    tdist.all_reduce, tdist.all_gather = recorded(tdist.all_reduce), recorded(tdist.all_gather)
    try:
        dev = torch.device(device)
        g = torch.Generator().manual_seed(rank)
        feats = {
            k: torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).to(dev).requires_grad_(True)
            for k in ("image_features", "text_features", "neg_text_features")
        }
        loss_fn = HQClipLoss(replace(LossConfig(), stc_weight=0.0), rank=rank, world_size=2)
        losses = loss_fn(
            **feats,
            logit_scale=torch.tensor([10.0], device=dev),
            neg_valid=torch.tensor([True, False, True, True], device=dev),
        )
        sum(losses.values()).backward()
        terms = reduce_for_logging({k: v.detach() for k, v in losses.items()}, 2)
        counts = text_counts(Counter(samples=8, long_text=2 + 4 * rank, truncated=rank), 2, dev)
        queue.put((rank, seen, terms, counts))
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))],
)
def test_every_tensor_handed_to_a_collective_is_on_the_engines_device(device):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_collective_worker, args=(r, port, device, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    expected = "cpu" if device == "cpu" else "cuda:0"
    for seen, _terms, counts in results.values():
        kinds = {name for name, _, _ in seen}
        assert kinds == {"all_reduce", "all_gather"}, kinds  # the loss gathers; the logs reduce
        assert ("all_reduce", expected, "torch.float64") in seen  # the text counts
        assert all(dev == expected for _, dev, _ in seen), seen
        assert counts == {  # summed over ranks
            "long_text_share": 8 / 16,
            "short_text_share": 0.0,
            "neg_share": 0.0,
            "neg_identical_share": 0.0,
            "neg_dropped_share": 0.0,
            "truncated_texts": 1,
        }
    assert results[0][1] == results[1][1]  # logged terms are the global values on every rank


def test_missing_init_clip_and_store_are_clear_errors(pair_store, tmp_path):
    from cycle.clip.train import TrainInputError, train_clip

    with pytest.raises(TrainInputError, match="init_clip"):
        train_clip(_cfg(), pair_store.uri, tmp_path / "a", 1, init_clip=tmp_path / "nope")
    with pytest.raises(TrainInputError, match="no LanceDB store"):
        train_clip(_cfg(), tmp_path / "no-store", tmp_path / "b", 1)


def test_an_initial_clip_of_another_architecture_is_refused(pair_store, tmp_path):
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip
    from cycle.clip.train import TrainInputError, train_clip

    other = save_clip(create_clip("hqclip-micro")[0], "hqclip-micro", tmp_path / "micro")
    with pytest.raises(TrainInputError, match="clip.name"):
        train_clip(_cfg("clip.name=hqclip-tiny"), pair_store.uri, tmp_path / "clip", 1, init_clip=other)


def test_cli_needs_one_data_source(tmp_path):
    from click.testing import CliRunner

    from cycle.cli import main

    result = CliRunner().invoke(main, ["train", str(tmp_path / "out")])
    assert result.exit_code != 0 and "exactly one of --run" in result.output
