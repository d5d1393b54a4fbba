"""Evaluation: metric definitions (by hand and against CLIP_benchmark's own code), sets, the stage, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cycle.config import EvalConfig
from cycle.evaluate import EvalDataError, evaluate_clip, evaluate_set, load_dataset, load_store_split
from cycle.evaluate.datasets import build_set
from cycle.evaluate.metrics import class_vectors, negative_metrics, retrieval_metrics, zeroshot_metrics
from cycle.status import KEY_METRICS

CLASSES = ["apple", "bicycle", "cat", "dog", "guitar", "hat"]
EDITS = ["object", "count", "relation"]


def png(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def zeroshot_rows(n=18):
    return [(f"z{i:02d}", png(i), {"label": CLASSES[i % len(CLASSES)]}) for i in range(n)]


def retrieval_rows(n=14):
    rows = []
    for i in range(n):
        caps = [f"{CLASSES[(i + j) % 6]} next to a {CLASSES[(2 * i + j) % 6]}" for j in range(1 + i % 3)]
        if i == 3:
            caps.append("a thing")  # the same caption for two images: a hit for either
        if i == 4:
            caps.append("a thing")
        rows.append((f"r{i:02d}", png(100 + i), {"captions": caps}))
    return rows


def negative_rows(n=8, prefix="n"):
    rows = []
    for i in range(n):
        pos = f"a {CLASSES[i % 6]} left of a {CLASSES[(i + 1) % 6]}"
        negs = [
            {"text": f"a {CLASSES[(i + 2) % 6]} left of a {CLASSES[(i + 1) % 6]}", "edit": "object"},
            {"text": f"two {CLASSES[i % 6]}s left of a {CLASSES[(i + 1) % 6]}", "edit": EDITS[1 + i % 2]},
        ]
        rows.append((f"{prefix}{i:02d}", png(200 + i), {"positive": pos, "negatives": negs, "captions": [pos]}))
    return rows


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    torch.manual_seed(2)
    model, _, val_tf, tok = create_clip("hqclip-micro")
    path = tmp_path_factory.mktemp("eval") / "clip"
    save_clip(model, "hqclip-micro", path)
    return model.eval(), val_tf, tok, path


# ----------------------------------------------------------------------------------------------- metrics
def test_retrieval_metrics_by_hand():
    images = torch.eye(3)
    texts = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0.9, 0.1], [0, 0.2, 1.0]])
    m = retrieval_metrics(images, texts, [0, 1, 1, 2])
    assert m["text_to_image_r1"] == pytest.approx(3 / 4)  # caption 1 points at image 2
    assert m["image_to_text_r1"] == pytest.approx(2 / 3)  # image 2's nearest caption is image 1's
    assert m["text_to_image_r5"] == 1.0 and m["image_to_text_r10"] == 1.0  # k past the set size: all
    assert m["retrieval_mean_r1"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_negative_metrics_by_hand():
    images, positives = torch.eye(2), torch.eye(2)
    negatives = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    m = negative_metrics(images, positives, negatives, [0, 0, 1], ["object", "Count", "object"])
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["acc_object"] == 1.0 and m["acc_count"] == 0.0  # a tie with the positive is a loss
    assert m["acc_all"] == 0.5  # image 0 lost one of its negatives


def test_zeroshot_metrics_by_hand():
    # 3 classes, 2 templates each; class 2's templates disagree, so its vector is their normalised mean
    templates = torch.tensor([[[1.0, 0, 0], [2.0, 0, 0]], [[0, 1.0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [0, 1.0, 0]]])
    cls = class_vectors(templates)
    assert torch.allclose(cls[2], torch.tensor([0, 1.0, 1.0]) / math.sqrt(2))
    images = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0.1, 1.0], [0, 0, 1.0]])
    m = zeroshot_metrics(images, cls, torch.tensor([0, 1, 1, 2]))
    assert m["top1"] == pytest.approx(3 / 4) and "top5" not in m  # fewer than 5 classes
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="text_image_index"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 5])
    with pytest.raises(ValueError, match="targets"):
        zeroshot_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="edit type"):
        negative_metrics(torch.eye(2), torch.eye(2), torch.eye(2), [0, 1], ["object"])


class _ClassDataset(torch.utils.data.Dataset):
    def __init__(self, ev, tf):
        self.ev, self.tf, self.classes = ev, tf, ev.classes

    def __len__(self):
        return len(self.ev)

    def __getitem__(self, i):
        item = self.tf(self.ev.image(i))
        if self.ev.labels is not None:
            return item, self.ev.classes.index(self.ev.labels[i])
        return item, self.ev.captions[i]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy scalar conversion inside CLIP_benchmark
def test_numbers_equal_clip_benchmark(micro):
    """Same model, same data: our zero-shot and retrieval numbers are CLIP_benchmark's own."""
    from clip_benchmark.metrics import zeroshot_classification as cb_zs
    from clip_benchmark.metrics import zeroshot_retrieval as cb_ret

    model, val_tf, tok, _ = micro
    cfg = EvalConfig(batch_size=8)
    zs = build_set("zs", zeroshot_rows())
    ours = evaluate_set(model, tok, val_tf, zs, cfg, "cpu", progress=False)
    loader = torch.utils.data.DataLoader(_ClassDataset(zs, val_tf), batch_size=8)
    theirs = cb_zs.evaluate(
        model, loader, tok, zs.classes, [t.replace("{}", "{c}") for t in cfg.templates], "cpu", amp=False
    )
    assert 0 < ours["top5"] < 1  # not a degenerate case
    assert ours["top1"] == pytest.approx(theirs["acc1"], abs=1e-12)
    assert ours["top5"] == pytest.approx(theirs["acc5"], abs=1e-12)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)

    ret = build_set("ret", retrieval_rows())
    ours = evaluate_set(model, tok, val_tf, ret, cfg, "cpu", progress=False)
    loader = torch.utils.data.DataLoader(
        _ClassDataset(ret, val_tf),
        batch_size=8,
        collate_fn=lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b]),
    )
    theirs = cb_ret.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):  # CLIP_benchmark averages recalls in float32: equal to its precision
        assert ours[f"text_to_image_r{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-7)
        assert ours[f"image_to_text_r{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-7)
    assert 0 < ours["retrieval_mean"] < 1  # not a degenerate case


# ----------------------------------------------------------------------------------------------- store
def _sample(id_, image, split, meta):
    return {
        "id": id_,
        "image": image,
        "alt_text": "x",
        "source": "test",
        "split": split,
        "width": 32,
        "height": 32,
        "sha256": hashlib.sha256(image).hexdigest(),
        "meta": json.dumps(meta),
    }


@pytest.fixture
def eval_store(tmp_path):
    from cycle.store import Store

    store = Store(tmp_path / "lance")
    rows = [_sample(i, im, "test_zeroshot", m) for i, im, m in zeroshot_rows(12)]
    rows += [_sample(i, im, "test_retrieval", m) for i, im, m in retrieval_rows(10)]
    rows += [
        _sample(i, im, "test_negatives", {k: v for k, v in m.items() if k != "captions"})
        for i, im, m in negative_rows(6)
    ]
    rows += [_sample(i, im, "val", m) for i, im, m in negative_rows(6, prefix="v")]
    rows += [_sample(f"t{i}", png(900 + i), "train", {}) for i in range(3)]
    store.append("samples", rows)
    return store


def test_evaluate_clip_on_store_splits(micro, eval_store, tmp_path):
    path = micro[3]
    version = eval_store.version("samples")
    out = tmp_path / "m" / "metrics.json"
    metrics = evaluate_clip(
        path, eval_store, None, EvalConfig(batch_size=16), samples_version=version, out_json=out, progress=False
    )
    for key in (
        "test_zeroshot/top1",
        "test_zeroshot/top5",
        "test_retrieval/image_to_text_r1",
        "test_retrieval/text_to_image_r10",
        "test_negatives/acc",
        "test_negatives/acc_object",
        "test_negatives/acc_count",
        "test_negatives/acc_relation",
        "val/retrieval_mean_r1",
        "val/acc_all",
    ):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "test_compositional/n_images" not in metrics  # absent split skipped when splits are defaults
    assert metrics["test_zeroshot/n_images"] == 12 and metrics["test_zeroshot/n_classes"] == 6
    assert json.loads(out.read_text()) == metrics

    # rows added after the pin do not leak into an evaluation at the pinned version
    eval_store.append("samples", [_sample("z99", png(999), "test_zeroshot", {"label": "hat"})])
    again = evaluate_clip(path, eval_store, ["test_zeroshot"], EvalConfig(), samples_version=version, progress=False)
    assert again["test_zeroshot/n_images"] == 12 and again["test_zeroshot/top1"] == metrics["test_zeroshot/top1"]
    with pytest.raises(EvalDataError, match="split 'test_compositional' has no rows"):
        evaluate_clip(path, eval_store, ["test_compositional"], EvalConfig(), progress=False)


def test_bad_store_rows_are_named(eval_store):
    eval_store.append(
        "samples",
        [_sample("bad1", png(1), "broken", {"label": "cat"}), _sample("bad2", png(2), "broken", {"label": "  "})],
    )
    with pytest.raises(EvalDataError, match="row 'bad2': missing or empty 'label'"):
        load_store_split(eval_store, "broken")
    row = _sample("bad3", png(3), "notjson", {})
    row["meta"] = "{oops"
    eval_store.append("samples", [row])
    with pytest.raises(EvalDataError, match="row 'bad3' has meta that is not JSON"):
        load_store_split(eval_store, "notjson")
    with pytest.raises(EvalDataError, match="letters, digits"):
        load_store_split(eval_store, "val' OR '1'='1")


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"positive": "a cat", "negatives": [{"edit": "object"}]}, "non-empty 'text'"),
        ({"positive": "a cat", "negatives": "a dog"}, "must be a list"),
        ({"captions": [3]}, "list of strings"),
        ({"captions": ["  "]}, "no non-empty caption"),
        ({"alt": "nothing to evaluate"}, "none of 'label', 'captions', 'positive'"),
        ({"positive": "a cat", "negatives": []}, "no row has a negative"),
    ],
)
def test_bad_annotations(meta, message):
    with pytest.raises(EvalDataError, match=message):
        build_set("s", [("k", b"", meta)])


def test_reworded_annotations_make_a_variant_set():
    rows = [
        ("a", b"1", {"captions": ["a cat"], "reworded": {"captions": ["one cat", "cat: 1"]}}),
        ("b", b"2", {"captions": ["a dog"], "reworded": {"captions": ["one dog"]}}),
    ]
    ev = build_set("s", rows)
    (variant,) = ev.variants
    assert variant.name == "s_reworded" and variant.images == ev.images and variant.keys == ev.keys
    assert ev.captions == [["a cat"], ["a dog"]] and variant.captions == [["one cat", "cat: 1"], ["one dog"]]
    with pytest.raises(EvalDataError, match="row 'b': 'reworded' missing or not an object"):
        build_set("s", [rows[0], ("b", b"2", {"captions": ["a dog"]})])  # half a variant is an error
    with pytest.raises(EvalDataError, match="s_reworded: row 'b': missing 'captions'"):
        build_set("s", [rows[0], ("b", b"2", {"captions": ["a dog"], "reworded": {"styles": []}})])


# ----------------------------------------------------------------------------------------------- files
def _write_folder(root, n_per_class=2):
    for c, name in enumerate(["red_apple", "dog", "hat"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            (root / name / f"{i}.png").write_bytes(png(300 + 10 * c + i))
    (root / "notes.txt").write_text("ignored: not in a class folder")


def test_image_folder_dataset(micro, tmp_path):
    _write_folder(tmp_path / "folder")
    ev = load_dataset(tmp_path / "folder")
    assert ev.name == "folder" and ev.classes == ["dog", "hat", "red apple"] and len(ev) == 6
    m = evaluate_set(micro[0], micro[2], micro[1], ev, EvalConfig(), progress=False)
    assert set(m) >= {"top1", "mean_per_class_recall"} and "top5" not in m


def test_csv_and_jsonl_datasets(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(400 + i))
    (tmp_path / "caps.csv").write_text(
        "image,caption\nimg/0.png,a red apple\nimg/0.png,an apple on a plate\nimg/1.png,a dog\n"
        'img/2.png,"a hat, blue"\n'
    )
    ev = load_dataset(tmp_path / "caps.csv")
    assert ev.captions == [["a red apple", "an apple on a plate"], ["a dog"], ["a hat, blue"]]
    lines = [
        {
            "image": "img/0.png",
            "captions": ["a", "b"],
            "positive": "a red apple",
            "negatives": [{"text": "a green apple", "edit": "attribute"}],
        },
        {"image": "img/1.png", "captions": ["c"], "positive": "a dog", "negatives": ["two dogs"]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ev = load_dataset(tmp_path / "d.jsonl")
    assert ev.tasks == ["retrieval", "negatives"]
    assert ev.negatives[1] == [{"text": "two dogs", "edit": "unknown"}]


def test_dataset_errors(micro, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png(1))
    cases = {
        "missing.csv": ("image,caption\nimg/nope.png,a cat\n", "1 image file\\(s\\) not found.*nope.png"),
        "nocol.csv": ("picture,caption\nimg/ok.png,a cat\n", "line 2: no image path"),
        "empty.csv": ("", "empty"),
        "header.csv": ("image,caption\n", "no rows"),
        "bad.jsonl": ('{"image": "img/ok.png", "captions": ["a"]}\n{broken\n', "line 2 is not valid JSON"),
        "nocap.csv": ("image,caption\nimg/ok.png,\n", "nothing to evaluate"),
        "data.parquet": ("x", "expected a folder"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(EvalDataError, match=message):
            load_dataset(tmp_path / name)
    (tmp_path / "latin1.csv").write_bytes("image,caption\nimg/ok.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(EvalDataError, match="not UTF-8"):
        load_dataset(tmp_path / "latin1.csv")
    with pytest.raises(EvalDataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere.jsonl")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(EvalDataError, match="no class subfolders"):
        load_dataset(tmp_path / "emptydir")
    # a corrupt image is found when it is read, and named
    (tmp_path / "corrupt" / "cat").mkdir(parents=True)
    (tmp_path / "corrupt" / "cat" / "0.png").write_bytes(b"\x89PNG not really")
    ev = load_dataset(tmp_path / "corrupt")
    with pytest.raises(EvalDataError, match="cat/0.png.*unreadable"):
        evaluate_set(micro[0], micro[2], micro[1], ev, EvalConfig(), progress=False)
    with pytest.raises(EvalDataError, match="templates is empty"):
        evaluate_set(
            micro[0], micro[2], micro[1], load_dataset(tmp_path / "corrupt"), EvalConfig(templates=[]), progress=False
        )


def test_cli_eval(micro, tmp_path):
    from click.testing import CliRunner

    from cycle.cli import main

    _write_folder(tmp_path / "classes")
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        main, ["eval", str(micro[3]), "--dataset", str(tmp_path / "classes"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["classes/top1"] <= 1 and "top1" in result.output
    result = CliRunner().invoke(main, ["eval", str(micro[3]), "--split", "val"])
    assert result.exit_code != 0 and "--split needs --run" in result.output
    result = CliRunner().invoke(main, ["eval", str(micro[3])])
    assert result.exit_code != 0 and "nothing to evaluate" in result.output
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--dataset", str(tmp_path / "classes")])
    assert result.exit_code != 0 and "does not exist" in result.output


def test_evaluate_on_the_built_in_emoji_splits(micro, tiny_store, tiny_cfg):
    """The real held-out splits of the emoji-scenes builder carry the keys evaluation reads."""
    version = tiny_store.version("samples")
    metrics = evaluate_clip(micro[3], tiny_store, None, tiny_cfg.eval, samples_version=version, progress=False)
    emoji = tiny_cfg.data.emoji
    assert metrics["val/n_images"] == emoji.n_val and "val/retrieval_mean_r1" in metrics
    assert metrics["test_retrieval/n_images"] == emoji.n_test_retrieval
    assert metrics["test_negatives/n_negatives"] >= emoji.n_test_negatives
    assert {"test_negatives/acc_object", "test_negatives/acc_relation", "test_negatives/acc_count"} <= set(metrics)
    assert metrics["test_zeroshot/n_classes"] == emoji.vocab_size and "test_zeroshot/top5" in metrics
    assert "test_compositional/retrieval_mean_r1" in metrics
    # every held-out caption set again in other wordings (`data.emoji.reword`), under its own names
    for split in ("test_retrieval", "test_negatives", "test_compositional"):
        plain = {k.split("/", 1)[1] for k in metrics if k.startswith(f"{split}/")}
        reworded = {k.split("/", 1)[1] for k in metrics if k.startswith(f"{split}_reworded/")}
        assert plain == reworded and metrics[f"{split}_reworded/n_images"] == metrics[f"{split}/n_images"]
    assert metrics["test_retrieval_reworded/n_texts"] > metrics["test_retrieval/n_texts"]  # 1..3 per image
    assert metrics["test_negatives_reworded/n_negatives"] == metrics["test_negatives/n_negatives"]
    assert not any(k.startswith(("val_", "test_zeroshot_")) for k in metrics)  # val and zero-shot as they were
    assert set(KEY_METRICS.values()) <= set(metrics)  # the status and report columns, the reworded ones too
    # the template metrics are what the split alone gives: the variant changes none of them
    alone = load_store_split(tiny_store, "test_negatives", version)
    alone.variants = []
    m = evaluate_set(micro[0], micro[2], micro[1], alone, tiny_cfg.eval, progress=False)
    assert m == {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test_negatives/")}
    assert m != {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("test_negatives_reworded/")}


def test_cli_eval_on_a_run(micro, tmp_path):
    from click.testing import CliRunner

    from cycle.cli import main
    from cycle.config import load_config, save_config
    from cycle.pipeline import store_of
    from cycle.state import RunState

    cfg = load_config(None, [f"root={tmp_path}", "name=run"])
    save_config(cfg, cfg.run_dir)
    store = store_of(cfg)
    store.append("samples", [_sample(i, im, "val", m) for i, im, m in negative_rows(5, prefix="v")])
    version = store.version("samples")
    store.append("samples", [_sample("v99", png(5), "val", negative_rows(1)[0][2])])  # after the pin
    RunState(cfg.run_dir).mark_done(0, "data", "fp", outputs={"samples_version": version})
    out = tmp_path / "m.json"
    result = CliRunner().invoke(
        main, ["eval", str(micro[3]), "--run", str(cfg.run_dir), "--split", "val", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["val/n_images"] == 5 and "val/retrieval_mean_r1" in metrics  # the run's pinned version
    result = CliRunner().invoke(main, ["eval", str(micro[3]), "--run", str(cfg.run_dir), "--split", "test_zeroshot"])
    assert result.exit_code != 0 and "has no rows" in result.output


def test_a_checkpoint_with_an_stc_head_gets_tag_metrics(micro, eval_store, tmp_path):
    from cycle.clip.model import CosineTagHead
    from cycle.clip.saved import save_clip
    from cycle.clip.text import tags_named_in
    from cycle.evaluate.metrics import tag_metrics

    model, val_tf, tok, _ = micro
    torch.manual_seed(3)
    head, vocab = CosineTagHead(model.visual.output_dim, 4), ["apple", "cat", "guitar", "boat"]
    path = save_clip(
        model,
        "hqclip-micro",
        tmp_path / "clip",
        extra_tensors={"stc_head": head.state_dict()},
        extra_json={"tag_vocab": vocab},
    )
    version = eval_store.version("samples")
    metrics = evaluate_clip(
        path, eval_store, ["val", "test_zeroshot"], EvalConfig(), samples_version=version, progress=False
    )
    # the same numbers by hand: the head on the unit-norm image features, targets from the val texts
    ev = load_store_split(eval_store, "val", version)
    feats = torch.nn.functional.normalize(
        torch.stack([model.encode_image(val_tf(ev.image(i))[None])[0] for i in range(len(ev))]).detach(), dim=-1
    )
    texts = [ev.captions[i] + [ev.positives[i]] for i in range(len(ev))]
    want = tag_metrics(head(feats).detach(), tags_named_in(texts, vocab))
    assert want["tag_map_tags"] == 3  # "boat" is named nowhere
    for key, value in want.items():
        assert metrics[f"val/{key}"] == pytest.approx(value, abs=1e-5), key
    assert "test_zeroshot/tag_map" not in metrics  # a set without texts has no tag targets
