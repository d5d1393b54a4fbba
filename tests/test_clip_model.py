"""The CLIP factory and checkpoint directories: build, save, load (ours and open_clip's own local-dir)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from torch import nn

from cycle.clip.model import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, create_clip, list_architectures
from cycle.clip.saved import is_checkpoint, load_clip, save_clip

PROMPTS = ["a photo of a red apple.", "two dogs left of a bicycle", ""]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    model, train_tf, val_tf, tok = create_clip("hqclip-micro")
    return model.eval(), train_tf, val_tf, tok


@pytest.fixture(scope="module")
def micro_ckpt(micro, tmp_path_factory):
    model = micro[0]
    path = tmp_path_factory.mktemp("ckpt") / "clip"
    head = {"weight": torch.randn(7, 64), "bias": torch.zeros(7)}
    save_clip(model, "hqclip-micro", path, extra_tensors={"stc_head": head}, extra_json={"tag_vocab": ["apple", "dog"]})
    return path, head


def _embed(model, tok, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tok(PROMPTS))


def test_micro_is_a_plain_vit_with_nonscalar_logit_scale(micro):
    model, train_tf, val_tf, tok = micro
    assert model.logit_scale.shape == (1,)  # DeepSpeed cannot shard 0-dim parameters
    assert model.visual.image_size == (32, 32)
    assert model.visual.attn_pool is None and model.visual.pool_type == "tok"
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)  # quick_gelu: false
    assert tok(["hello"]).shape == (1, 77)
    from PIL import Image

    assert val_tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert train_tf(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    img, txt = _embed(model, tok, torch.randn(2, 3, 32, 32))
    assert img.shape == (2, 64) and txt.shape == (3, 64)


def test_tiny_config_and_registry():
    assert {"hqclip-tiny", "hqclip-micro", "ViT-B-16"} <= set(list_architectures())
    cfg = open_clip.get_model_config("hqclip-tiny")
    assert cfg["vision_cfg"]["image_size"] == 64 and cfg["vision_cfg"]["patch_size"] == 8
    assert cfg["embed_dim"] == 128 and not cfg.get("quick_gelu")


def test_image_size_override():
    model, _, val_tf, _ = create_clip("hqclip-micro", image_size=64)
    assert model.visual.positional_embedding.shape == (65, 64)  # (64/8)^2 patches + CLS
    assert val_tf.transforms[1].size == (64, 64)


def test_unknown_architecture_is_a_clear_error():
    from cycle.errors import HQClipError

    with pytest.raises(HQClipError, match="unknown CLIP architecture 'no-such-clip'"):
        create_clip("no-such-clip")


def test_save_load_roundtrip_with_extras(micro, micro_ckpt):
    model, _, _, tok = micro
    path, head = micro_ckpt
    assert is_checkpoint(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    assert cfg["model_name"] == "hqclip-micro" and cfg["model_cfg"]["vision_cfg"]["image_size"] == 32
    loaded, val_tf, tok2, extras = load_clip(path)
    assert not loaded.training and loaded.logit_scale.shape == (1,)
    images = torch.randn(3, 3, 32, 32)
    for a, b in zip(_embed(model, tok, images), _embed(loaded, tok2, images)):
        assert torch.equal(a, b)
    assert torch.equal(extras["stc_head"]["weight"], head["weight"])
    assert extras["tag_vocab"] == ["apple", "dog"]


def test_checkpoint_loads_with_open_clip_alone(micro, micro_ckpt):
    """The directory is open_clip's local-dir format: no project code needed to use it."""
    model, _, _, tok = micro
    path, _ = micro_ckpt
    oc_model, _, oc_val = open_clip.create_model_and_transforms(f"local-dir:{path}")
    oc_tok = open_clip.get_tokenizer(f"local-dir:{path}")
    oc_model.eval()
    assert torch.equal(oc_tok(PROMPTS), tok(PROMPTS))
    images = torch.randn(2, 3, 32, 32)
    for a, b in zip(_embed(model, tok, images), _embed(oc_model, oc_tok, images)):
        assert torch.equal(a, b)


def test_create_from_checkpoint_dir_as_pretrained(micro, micro_ckpt):
    model, _, _, tok = micro
    path, _ = micro_ckpt
    again, *_ = create_clip("hqclip-micro", pretrained=str(path))
    again.eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(_embed(model, tok, images)[0], _embed(again, tok, images)[0])


def test_save_replaces_existing_dir_without_leftovers(micro, tmp_path):
    model = micro[0]
    path = tmp_path / "clip"
    save_clip(model, "hqclip-micro", path, extra_json={"old": 1})
    save_clip(model, None, path)  # the name create_clip recorded on the model
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["clip"]


def test_save_rejects_reserved_extra_names(micro, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_clip(micro[0], "hqclip-micro", tmp_path / "c", extra_json={"open_clip_config": {}})
    assert not (tmp_path / "c").exists()


def test_load_errors_name_the_problem(micro, micro_ckpt, tmp_path):
    from cycle.errors import HQClipError

    assert issubclass(CheckpointError, HQClipError)  # the CLI's one-line error, no traceback
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no {CONFIG_FILE}"):
        load_clip(tmp_path / "empty")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_clip(bad)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / CONFIG_FILE).write_text((micro_ckpt[0] / CONFIG_FILE).read_text())
    with pytest.raises(CheckpointError, match=f"no {WEIGHTS_FILE}"):
        load_clip(noweights)


def test_weights_of_another_architecture_do_not_load(micro_ckpt, tmp_path):
    other, *_ = create_clip("hqclip-micro", image_size=64)
    save_clip(other, "hqclip-micro", tmp_path / "other")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / CONFIG_FILE).write_text((micro_ckpt[0] / CONFIG_FILE).read_text())
    (mixed / WEIGHTS_FILE).write_bytes((tmp_path / "other" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="does not load"):
        load_clip(mixed)


def test_corrupt_extra_file_is_named(micro_ckpt, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(micro_ckpt[0], copy)
    (copy / "stc_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="stc_head.safetensors"):
        load_clip(copy)


def test_loaded_model_saves_again_without_a_registered_name(micro_ckpt, tmp_path):
    """A checkpoint carries its own config: re-saving needs no registry entry for its name."""
    import shutil

    copy = tmp_path / "custom"
    shutil.copytree(micro_ckpt[0], copy)
    cfg = json.loads((copy / CONFIG_FILE).read_text())
    cfg["model_name"] = "someone-elses-arch"
    (copy / CONFIG_FILE).write_text(json.dumps(cfg))
    model, _, tok, _ = load_clip(copy)
    save_clip(model, None, tmp_path / "again")
    again, _, _, _ = load_clip(tmp_path / "again")
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["model_name"] == "someone-elses-arch"
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(_embed(model, tok, images)[0], _embed(again, tok, images)[0])
