"""LVLM parts: the tiny LM's tokenizer and pretraining, and the LLaVA assembled on a CLIP tower."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_YAML
from lvlm_fixtures import shapes_rows
from safetensors import safe_open

from cycle.annotate.schema import build_prompt, model_input, to_target_json
from cycle.config import ConfigError, LMConfig, LVLMConfig, load_config

LM_CFG = dict(
    hidden_size=64, num_layers=2, num_heads=2, vocab_size=512, pretrain_epochs=3, pretrain_lr=3e-3, batch_size=16
)


@pytest.fixture(scope="module")
def texts():
    samples, seeds = shapes_rows(48)
    alt = {s["id"]: s["alt_text"] for s in samples}
    return [s["alt_text"] for s in samples] + [
        model_input(build_prompt(alt[r["id"]])) + to_target_json(r) for r in seeds
    ]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, texts):
    from cycle.lvlm import prepare_lm

    return prepare_lm(LMConfig(**LM_CFG), texts, tmp_path_factory.mktemp("lm") / "lm", progress=False)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    torch.manual_seed(0)
    model, _, _, _ = create_clip("hqclip-micro")
    return save_clip(model, "hqclip-micro", tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def lvlm_dir(tmp_path_factory, clip_dir, lm_dir):
    from cycle.lvlm import build_lvlm

    return build_lvlm(clip_dir, lm_dir, LVLMConfig(), tmp_path_factory.mktemp("lvlm") / "base")


def random_images(n: int, size: int = 32, seed: int = 0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arrays = (torch.rand(n, size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_keeps_json_skeleton_whole(texts):
    from cycle.lvlm.tokenizer import SPECIAL_TOKENS, json_pieces, train_tokenizer

    tok = train_tokenizer(texts, 512)
    target = texts[-1][texts[-1].index("answer:") + len("answer:") :]
    for text in [target, texts[0], model_input(build_prompt('ünïcode 🐶 "quoted" text'))]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text.replace("<image>", "")
    pieces = json_pieces()
    assert pieces[0] == '{"desc":["' and '","' in pieces and pieces[-1] == '"]}'
    for piece in pieces:  # each skeleton piece is one token
        assert len(tok(piece, add_special_tokens=False).input_ids) == 1
    for special in SPECIAL_TOKENS:
        assert len(tok(special, add_special_tokens=False).input_ids) == 1
    assert tok.convert_tokens_to_ids("<image>") == tok.image_token_id


# ----------------------------------------------------------------------------------------------- LM
def test_prepare_lm_trains_saves_and_is_reproducible(lm_dir, texts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cycle.lvlm import prepare_lm

    info = json.loads((lm_dir / "info.json").read_text())
    losses = info["epoch_losses"]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
    assert not (lm_dir / "fingerprint.json").exists()  # the controller's state.json is the only record
    lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    assert lm.config.hidden_size == 64 and lm.config.num_hidden_layers == 2
    assert lm.get_input_embeddings().num_embeddings == len(tok)
    again = prepare_lm(LMConfig(**LM_CFG), texts, tmp_path / "lm", progress=False)  # same inputs, same seed
    assert (again / "model.safetensors").read_bytes() == (lm_dir / "model.safetensors").read_bytes()
    assert json.loads((again / "info.json").read_text())["epoch_losses"] == losses


def test_pretrain_lm_always_trains_and_replaces_the_folder_whole(tmp_path, texts):
    from cycle.lvlm import pretrain_lm

    cfg = LMConfig(**{**LM_CFG, "pretrain_epochs": 1})
    out = pretrain_lm(cfg, texts[:20], tmp_path / "lm", progress=False)
    assert json.loads((out / "info.json").read_text())["texts"] == 20
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_lm(cfg, texts[:21], tmp_path / "lm", progress=False) == out
    assert json.loads((out / "info.json").read_text())["texts"] == 21
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]  # no staging or old directory left behind


def test_prepare_lm_passes_hub_names_through(tmp_path):
    from cycle.lvlm import prepare_lm

    name = "Qwen/Qwen2.5-7B-Instruct"
    assert prepare_lm(LMConfig(name=name), ["unused"], tmp_path / "lm") == name
    assert not (tmp_path / "lm").exists()


def test_prepare_lm_bad_inputs(tmp_path):
    from cycle.errors import HQClipError
    from cycle.lvlm import prepare_lm

    with pytest.raises(HQClipError, match="no text"):
        prepare_lm(LMConfig(**LM_CFG), ["", "   "], tmp_path / "lm", progress=False)
    with pytest.raises(ConfigError, match="'lvlm.lm.hidden_size': 65 is not a multiple of lvlm.lm.num_heads=4"):
        load_config(TINY_YAML, ["lvlm.lm.hidden_size=65", "lvlm.lm.num_heads=4"])
    with pytest.raises(ConfigError, match="lvlm.lm.num_heads"):
        load_config(TINY_YAML, ["lvlm.lm.num_heads=0"])
    load_config(TINY_YAML, ["lvlm.lm.name=some/hub-lm", "lvlm.lm.hidden_size=65"])  # a hub LM has its own sizes
    assert not (tmp_path / "lm").exists()


# ----------------------------------------------------------------------------------------------- LLaVA
def test_tower_hidden_states_equal_open_clip(lvlm_dir, clip_dir):
    from cycle.clip.saved import load_clip
    from cycle.lvlm import load_lvlm

    clip, preprocess, _, _ = load_clip(clip_dir)
    model, processor = load_lvlm(lvlm_dir)
    images = random_images(4)
    pixels = torch.stack([preprocess(im) for im in images])
    assert torch.allclose(processor.image_processor(images, return_tensors="pt").pixel_values, pixels, atol=1e-5)
    visual = clip.visual
    with torch.no_grad():
        x = visual._embeds(pixels)
        reference = [x]
        for block in visual.transformer.resblocks:
            x = block(x)
            reference.append(x)
        ours = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(reference) == 3
    for a, b in zip(reference, ours):
        assert (a - b).abs().max().item() < 1e-5


def test_saved_keys_are_the_llava_hf_layout_and_load_without_leftovers(lvlm_dir):
    from transformers import LlavaForConditionalGeneration

    index = json.loads((lvlm_dir / "model.safetensors.index.json").read_text())
    keys = []
    for part in sorted(set(index["weight_map"].values())):
        with safe_open(str(lvlm_dir / part), "pt") as f:
            keys += [k for k in f.keys() if index["weight_map"][k] == part]
    assert sorted(keys) == sorted(index["weight_map"])  # one file per part, every key in the index once
    assert {index["weight_map"][k] for k in keys if k.startswith("multi_modal_projector.")} == {"projector.safetensors"}
    assert {index["weight_map"][k] for k in keys if k.startswith("vision_tower.")} == {"tower.safetensors"}
    assert {index["weight_map"][k] for k in keys if k.startswith("language_model.")} == {"lm.safetensors"}
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert any(k.startswith("multi_modal_projector.linear_2.") for k in keys)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    _, info = LlavaForConditionalGeneration.from_pretrained(lvlm_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_llava_reloads_offline_and_generates(lvlm_dir):
    from cycle.lvlm import load_lvlm

    model, processor = load_lvlm(lvlm_dir)
    cfg = model.config
    assert cfg.vision_feature_select_strategy == "full" and cfg.vision_feature_layer == -2
    assert cfg.image_seq_length == 17  # 4x4 patches + CLS
    assert type(model.model.multi_modal_projector.act).__name__ == "GELUActivation"
    prompt = model_input(build_prompt("a red circle"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt("a red circle")}]}
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=random_images(2),
        text=[prompt, model_input(build_prompt("IMG_1.png"))],
        return_tensors="pt",
        padding=True,
    )
    assert int((inputs.input_ids[0] == cfg.image_token_id).sum()) == 17
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (2, inputs.input_ids.shape[1] + 6)


def test_default_strategy_drops_the_cls_token_and_build_is_reproducible(tmp_path, clip_dir, lm_dir, lvlm_dir):
    from cycle.lvlm import build_lvlm, load_lvlm

    again = build_lvlm(clip_dir, lm_dir, LVLMConfig(), tmp_path / "again")  # the same seeded projector
    for part in ("lm", "tower", "projector"):
        assert (again / f"{part}.safetensors").read_bytes() == (lvlm_dir / f"{part}.safetensors").read_bytes()
    assert json.loads((again / "info.json").read_text())["seed"] == 0
    out = build_lvlm(clip_dir, lm_dir, LVLMConfig(keep_cls_token=False, vision_feature_layer=-1), tmp_path / "b")
    model, processor = load_lvlm(out)
    assert model.config.vision_feature_select_strategy == "default" and model.config.image_seq_length == 16
    inputs = processor(images=random_images(1), text=[model_input("x")], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == inputs.input_ids.shape[1]


def test_build_lvlm_bad_inputs(tmp_path, clip_dir, lm_dir):
    from cycle.clip.model import CheckpointError
    from cycle.lvlm import build_lvlm, load_lvlm

    with pytest.raises(ValueError, match="lvlm.vision_feature_layer"):
        build_lvlm(clip_dir, lm_dir, LVLMConfig(vision_feature_layer=-4), tmp_path / "x")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_lvlm(tmp_path / "no-clip", lm_dir, LVLMConfig(), tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="not an LVLM directory"):
        load_lvlm(tmp_path / "nothing")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_config_in_tiny_yaml_builds():
    cfg = load_config(TINY_YAML)
    assert cfg.lvlm.lm.hidden_size % cfg.lvlm.lm.num_heads == 0
