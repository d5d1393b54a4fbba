"""open_clip -> transformers conversion and the exports: same hidden states and embeddings (1e-5)."""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cycle.clip.convert import ConversionError, openclip_to_hf_clip, openclip_vit_to_hf_vision
from cycle.clip.export import export_clip, export_hf_clip, export_open_clip
from cycle.clip.model import CheckpointError, create_clip, register_model_configs
from cycle.clip.saved import load_clip, save_clip

TOL = 1e-5
PROMPTS = ["a photo of a red apple.", "two dogs left of a bicycle", "", "a guitar " * 60]


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(1)
    model, _, val_tf, tok = create_clip("hqclip-micro")
    return model.eval(), val_tf, tok


@pytest.fixture(scope="module")
def ckpt(micro, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "clip"
    save_clip(micro[0], "hqclip-micro", path, extra_json={"tag_vocab": ["apple"]})
    return path


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@torch.no_grad()
def test_vision_tower_hidden_states_match(micro):
    model = micro[0]
    hf = openclip_vit_to_hf_vision(model.visual)
    assert hf.config.hidden_act == "gelu" and hf.config.image_size == 32 and hf.config.patch_size == 8
    images = torch.randn(3, 3, 32, 32)
    out = hf(pixel_values=images, output_hidden_states=True)
    ref = model.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    blocks = [torch.cat([p, s], dim=1) for p, s in zip(ref["image_intermediates_prefix"], ref["image_intermediates"])]
    assert len(out.hidden_states) == len(blocks) + 1
    x = model.visual._embeds(images)  # input of the first block, after ln_pre
    assert _max_diff(out.hidden_states[0], x) < TOL
    for i, block_out in enumerate(blocks):
        assert _max_diff(out.hidden_states[i + 1], block_out) < TOL, f"block {i}"
    assert _max_diff(out.pooler_output @ model.visual.proj, model.encode_image(images)) < TOL


@torch.no_grad()
def test_demo_patch16_tower_converts_exactly():
    from cycle.clip.model import create_clip

    torch.manual_seed(0)
    model = create_clip("hqclip-tiny-p16")[0].eval()  # the demo's tower: 64 px, 4 x 4 patches of 16
    hf = openclip_vit_to_hf_vision(model.visual)
    assert (hf.config.image_size, hf.config.patch_size) == (64, 16)
    images = torch.randn(2, 3, 64, 64)
    out = hf(pixel_values=images, output_hidden_states=True)
    last = model.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
    tokens = torch.cat([last["image_intermediates_prefix"][-1], last["image_intermediates"][-1]], dim=1)
    assert out.hidden_states[-1].shape[1] == 17 and _max_diff(out.hidden_states[-1], tokens) < TOL
    assert _max_diff(out.pooler_output @ model.visual.proj, model.encode_image(images)) < TOL


@torch.no_grad()
def test_quick_gelu_maps_to_quick_gelu():
    register_model_configs()
    model = open_clip.create_model("hqclip-micro", force_quick_gelu=True).eval()
    hf = openclip_vit_to_hf_vision(model.visual)
    assert hf.config.hidden_act == "quick_gelu"
    images = torch.randn(2, 3, 32, 32)
    assert _max_diff(hf(pixel_values=images).pooler_output @ model.visual.proj, model.encode_image(images)) < TOL


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"pool_type": "avg"}, "pools 'avg'"),
        ({"attentional_pool": True}, "attentional pooler"),
        ({"ls_init_value": 0.1}, "layer scale"),
        ({"no_ln_pre": True}, "no ln_pre"),
    ],
)
def test_non_plain_vits_are_refused(change, reason):
    register_model_configs()
    cfg = copy.deepcopy(open_clip.get_model_config("hqclip-micro"))
    cfg["vision_cfg"].update(change)
    model = open_clip.CLIP(**cfg)
    with pytest.raises(ConversionError, match=reason):
        openclip_vit_to_hf_vision(model.visual)


@torch.no_grad()
def test_whole_clip_converts_exactly(micro):
    model, _, tok = micro
    hf = openclip_to_hf_clip(model)
    images, ids = torch.randn(2, 3, 32, 32), tok(PROMPTS)  # includes an empty and a truncated prompt
    assert _max_diff(hf.get_image_features(pixel_values=images).pooler_output, model.encode_image(images)) < TOL
    assert _max_diff(hf.get_text_features(input_ids=ids).pooler_output, model.encode_text(ids)) < TOL
    assert float(hf.logit_scale) == pytest.approx(float(model.logit_scale))


@torch.no_grad()
def test_hf_export_reloads_with_transformers(micro, ckpt, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    model, val_tf, tok = micro
    diffs = export_hf_clip(ckpt, tmp_path / "hf")
    assert diffs["image"] < TOL and diffs["text"] < TOL and diffs["tokenizer_ids_equal"] is True
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    processor = CLIPProcessor.from_pretrained(tmp_path / "hf")
    # the processor's tokenizer gives open_clip's ids, so HF text features equal open_clip's
    enc = processor(text=PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    assert torch.equal(enc["input_ids"], tok(PROMPTS))
    assert (
        _max_diff(hf.get_text_features(input_ids=enc["input_ids"]).pooler_output, model.encode_text(tok(PROMPTS))) < TOL
    )
    # the image processor reproduces the eval transform (resize/crop/normalise) on a native-size image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert _max_diff(pixels[0], val_tf(image)) < 1e-4
    assert (
        _max_diff(hf.get_image_features(pixel_values=pixels).pooler_output, model.encode_image(val_tf(image)[None]))
        < 1e-4
    )


def test_open_clip_export(micro, ckpt, tmp_path):
    export_open_clip(ckpt, tmp_path / "oc")
    assert sorted(p.name for p in (tmp_path / "oc").iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    export_clip(ckpt, tmp_path / "oc2", "open_clip", include_extras=True)
    assert (tmp_path / "oc2" / "tag_vocab.json").is_file()
    model, _, tok = micro
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(oc.encode_image(images), model.encode_image(images))


def test_export_errors(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_hf_clip(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_open_clip(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="expected 'hf' or 'open_clip'"):
        export_clip(ckpt, tmp_path / "out", "onnx")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp directories left behind


def test_cli_export_clip(ckpt, tmp_path):
    from click.testing import CliRunner

    from cycle.cli import main

    result = CliRunner().invoke(main, ["export-clip", str(ckpt), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "max abs difference" in result.output and (tmp_path / "hf" / "config.json").is_file()
    result = CliRunner().invoke(main, ["export-clip", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert result.exit_code != 0 and "does not exist" in result.output
    loaded, *_ = load_clip(ckpt)  # the source checkpoint is untouched
    assert loaded is not None
