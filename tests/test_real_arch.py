"""The real architectures, offline, at tiny width: a llava-hf `LlavaForConditionalGeneration` (CLIP vision
config + Qwen2 text config) and a Qwen2 causal LM saved with `save_pretrained` as if downloaded, an open_clip
ViT-B-16-shaped CLIP (patch 16, the same block layout) at width 32 or 48; the cycle's LVLM stages run on
them through `lvlm.base` and `lvlm.lm.name`. Also the guards (QuickGELU, launchers), the shipped real
configs and the dry run. Every test name says `real_arch`."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_YAML
from lvlm_fixtures import shapes_rows
from safetensors.torch import load_file

from cycle.annotate.schema import build_prompt, render_input
from cycle.config import ConfigError, load_config

VOCAB = 600
IMAGE_SIZE, PATCH = 64, 16  # ViT-B-16's patch at 4x4 patches: 16 image tokens
# a llava-1.5-style conversation format: the base's template must reach SFT and annotation
LLAVA_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}{{ 'USER: ' }}"
    "{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{{ ' ' }}{%- else -%}{{ 'ASSISTANT: ' }}"
    "{%- for part in message['content'] -%}{{ part['text'] }}{%- endfor -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def qwen2_config(tok):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def vitb16_shaped_clip(root, width: int):
    """An open_clip CLIP with ViT-B-16's layout (patch 16, learned positions, CLS pooling, GELU) at tiny
    width, from a model config registered like a bundled one; saved as the cycle saves CLIPs."""
    import open_clip

    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip

    name = f"test-vitb16-w{width}"
    cfg_dir = root / f"cfg-{width}"
    cfg_dir.mkdir()
    vitb16 = open_clip.get_model_config("ViT-B-16")
    cfg = {
        "embed_dim": 32,
        "quick_gelu": vitb16.get("quick_gelu", False),
        "vision_cfg": {**vitb16["vision_cfg"], "image_size": IMAGE_SIZE, "width": width, "layers": 2, "head_width": 16},
        "text_cfg": {**vitb16["text_cfg"], "width": 32, "heads": 2, "layers": 1},
    }
    (cfg_dir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(width)
    model, _, _, _ = create_clip(name)
    return save_clip(model, name, root / f"clip-{width}"), cfg


def build_real_arch_world(root) -> dict:
    """Under `root`: a store with 16 shapes pairs and their seeds, a Qwen2 causal LM and a llava-hf LLaVA
    (CLIP vision config + Qwen2 text config, llava-1.5 template) saved as if downloaded, and ViT-B-16-shaped
    CLIPs of width 32 (the base's tower width) and 48. Also used by benchmarks/disk_per_generation.py."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2ForCausalLM,
    )

    from cycle.lvlm.tokenizer import train_tokenizer
    from cycle.store import Store

    samples, seeds = shapes_rows(16)
    store = Store(root / "lance")
    store.append("samples", samples)
    store.insert_new("teacher", seeds)
    texts = [s["alt_text"] for s in samples] + [" ".join(r["desc"]) for r in seeds] * 4
    tok = train_tokenizer(texts + [build_prompt(s["alt_text"]) for s in samples], VOCAB)

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(qwen2_config(tok))
    qwen.save_pretrained(root / "qwen2-lm")
    tok.save_pretrained(root / "qwen2-lm")

    torch.manual_seed(1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
        ),
        text_config=qwen2_config(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
    )
    llava = LlavaForConditionalGeneration(config)
    llava.save_pretrained(root / "llava-base")
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    ).save_pretrained(root / "llava-base")
    clip32, clip_cfg = vitb16_shaped_clip(root, 32)
    clip48, _ = vitb16_shaped_clip(root, 48)
    return {
        "root": root,
        "store": store,
        "sv": store.version("samples"),
        "tv": store.version("teacher"),
        "base": root / "llava-base",
        "qwen": root / "qwen2-lm",
        "clip32": clip32,
        "clip48": clip48,
        "clip_cfg": clip_cfg,
        "n": len(samples),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_real_arch_world(tmp_path_factory.mktemp("real-arch"))


def cfg_for(world, *overrides):
    return load_config(
        TINY_YAML,
        [
            "device=cpu",
            f"store.uri={world['root'] / 'lance'}",
            "lvlm.keep_cls_token=false",
            "lvlm.align.epochs=1",
            "lvlm.align.batch_size=8",
            "lvlm.align.warmup_steps=1",
            "lvlm.sft.epochs=1",
            "lvlm.sft.batch_size=8",
            "lvlm.sft.warmup_steps=1",
            "lvlm.lora.enabled=true",
            "lvlm.lora.r=4",
            "lvlm.lora.alpha=8",
            "lvlm.lora.dropout=0.0",
            "lvlm.sft_fresh_alt_text=false",
            "lvlm.lm.max_length=160",
            "annotate.batch_size=16",
            "annotate.max_new_tokens=6",
            "annotate.retries=0",
            *overrides,
        ],
    )


def run_stage(cfg, name, pins, out):
    from cycle.pipeline import make_stages

    return make_stages(cfg)[name].run(cfg, pins, out, progress=False)


def state(directory) -> dict:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(directory).state_dict()


@pytest.fixture(scope="module")
def base_run(world):
    """lm -> lvlm -> align -> sft through the pipeline's stages, from `lvlm.base` (widths match)."""
    cfg = cfg_for(world, f"lvlm.base={world['base']}")
    root = world["root"] / "run-base"
    data = {"samples_version": world["sv"], "teacher_version": world["tv"]}
    lm = run_stage(cfg, "lm", {"data": data}, root / "lm").outputs
    built = run_stage(cfg, "lvlm", {"clip": str(world["clip32"]), "lm": lm["lm"]}, root / "base").outputs
    pins = {"data": data, "generation": 1, "previous": None}
    aligned = run_stage(cfg, "align", {**pins, "base": built}, root / "aligned").outputs
    sft = run_stage(cfg, "sft", {**pins, "aligned": aligned}, root / "sft").outputs
    return {"cfg": cfg, "lm": lm, "built": built, "aligned": aligned, "sft": sft, "data": data, "root": root}


# ----------------------------------------------------------------------------------------------- lvlm.base
def test_real_arch_base_llava_lends_lm_template_and_projector(world, base_run):
    from transformers import AutoProcessor

    from cycle.clip.saved import load_clip

    assert base_run["lm"] == {"lm": str(world["base"])}  # nothing prepared: the base brings its LM
    built = base_run["built"]["lvlm"]
    info = json.loads((world["root"] / "run-base" / "base" / "info.json").read_text())
    assert info["projector"] == "reused" and info["base_projector_in"] == 32
    ours, theirs = state(built), state(world["base"])
    shared = [k for k in theirs if k.startswith(("model.language_model.", "lm_head.", "model.multi_modal_projector."))]
    assert len([k for k in shared if "projector" in k]) == 4
    for k in shared:  # the base's LM and projector, weight for weight
        assert torch.equal(ours[k], theirs[k]), k
    # the tower is our CLIP's, not the base's
    clip, _, _, _ = load_clip(world["clip32"])
    patch = next(k for k in ours if k.endswith("embeddings.patch_embedding.weight"))
    assert torch.equal(ours[patch], clip.visual.conv1.weight.detach())
    assert not torch.equal(ours[patch], theirs[patch])
    processor = AutoProcessor.from_pretrained(built)
    assert processor.chat_template == LLAVA_TEMPLATE
    assert render_input(processor, "p").startswith("USER: <image>\np ASSISTANT:")
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(world["base"]).tokenizer.get_vocab()


def test_real_arch_base_with_other_width_gets_a_fresh_projector(world, tmp_path):
    from cycle.lvlm import build_lvlm, load_lvlm

    cfg = cfg_for(world, f"lvlm.base={world['base']}")
    out = build_lvlm(world["clip48"], str(world["base"]), cfg.lvlm, tmp_path / "b48", device="cpu")
    info = json.loads((out / "info.json").read_text())
    assert info["projector"] == "fresh" and info["base_projector_in"] == 32
    model, processor = load_lvlm(out)
    assert model.model.multi_modal_projector.linear_1.in_features == 48
    assert model.config.projector_hidden_act == "gelu" and model.config.image_seq_length == 16
    inputs = processor(images=[_image(world)], text=[render_input(processor, "x")], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def _image(world):
    import io

    from PIL import Image

    row = world["store"].read("samples", ["image"], version=world["sv"]).to_pylist()[0]
    return Image.open(io.BytesIO(row["image"])).convert("RGB")


# ----------------------------------------------------------------------------------------------- SFT + annotation
def test_real_arch_lora_sft_keeps_adapter_and_projector_only(world, base_run):
    from cycle.lvlm import load_lvlm

    sft = base_run["sft"]
    assert sft["merged"] is None and sft["base"] == base_run["aligned"]["lvlm"]  # no full copy
    sft_dir = base_run["root"] / "sft"
    assert sorted(p.name for p in sft_dir.iterdir()) == ["adapter", "info.json", "log.jsonl", "projector.safetensors"]
    adapter = load_file(str(sft_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "language_model" in k for k in adapter)
    aligned, _ = load_lvlm(base_run["aligned"]["lvlm"])
    projector = load_file(str(sft_dir / "projector.safetensors"))
    for k, v in aligned.model.multi_modal_projector.state_dict().items():
        assert torch.equal(projector[k], v)
    # alignment trained the reused projector: it moved away from the base's
    base_proj = state(world["base"])["model.multi_modal_projector.linear_1.weight"]
    assert not torch.equal(base_proj, projector["linear_1.weight"])
    info = json.loads((sft_dir / "info.json").read_text())
    assert info["adapter_only"] and info["metrics"]["sft/loss_after"] < info["metrics"]["sft/loss_before"]


def test_real_arch_annotation_merges_adapter_in_memory_like_a_merged_copy(world, base_run, tmp_path):
    from cycle.annotate.backends.transformers_backend import TransformersBackend
    from cycle.export import _merge_adapter

    sft, data = base_run["sft"], base_run["data"]
    pins = {"data": data, "generation": 1, "model": sft, "clip": str(world["clip32"])}
    run_stage(base_run["cfg"], "annotate", pins, base_run["root"] / "annotate")
    rows = world["store"].read("annotations", ["id", "annotator"], "generation = 1").to_pylist()
    assert len(rows) == world["n"] and all("+lora:" in r["annotator"] for r in rows)  # base + adapter served
    # the same greedy tokens as the merged LLaVA an export writes
    _merge_adapter(sft["base"], sft["adapter"], tmp_path / "merged")
    batch = [(_image(world), build_prompt("a red circle")), (_image(world), build_prompt("IMG_0001.png"))]
    kw = dict(device="cpu", max_new_tokens=5, min_new_tokens=5)
    in_memory = TransformersBackend(sft["base"], lora_dir=sft["adapter"], **kw)
    merged = TransformersBackend(tmp_path / "merged", **kw)
    assert "+lora:" in in_memory.fingerprint
    assert in_memory.generate(batch) == merged.generate(batch)
    assert in_memory.last_token_ids == merged.last_token_ids


def test_real_arch_gradient_checkpointing_trains_the_same_adapter(world, base_run, tmp_path):
    from cycle.lvlm import sft

    outs = {}
    for flag in ("false", "true"):
        cfg = cfg_for(world, f"lvlm.base={world['base']}", f"lvlm.sft_gradient_checkpointing={flag}")
        adapter, merged, _ = sft(
            base_run["aligned"]["lvlm"], world["store"], world["sv"], world["tv"], cfg, tmp_path / flag, progress=False
        )
        assert merged is None
        outs[flag] = load_file(str(adapter / "adapter_model.safetensors"))
    assert outs["true"].keys() == outs["false"].keys()
    for k in outs["true"]:
        assert torch.allclose(outs["true"][k], outs["false"][k], atol=1e-6), k
    config = json.loads((tmp_path / "true" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_real_arch_merged_path_still_serves_the_transformers_backend(world, base_run, tmp_path):
    from cycle.annotate.backends.transformers_backend import TransformersBackend
    from cycle.lvlm import sft

    cfg = cfg_for(world, f"lvlm.base={world['base']}", "lvlm.sft_save=merged")
    adapter, merged, _ = sft(
        base_run["aligned"]["lvlm"], world["store"], world["sv"], world["tv"], cfg, tmp_path / "m", progress=False
    )
    assert adapter.is_dir() and (merged / "config.json").is_file()
    backend = TransformersBackend(merged, device="cpu", max_new_tokens=4, min_new_tokens=4)
    assert len(backend.generate([(_image(world), "x")])) == 1 and len(backend.last_token_ids[0]) <= 4
    assert "+lora" not in backend.fingerprint


# ----------------------------------------------------------------------------------------------- lvlm.lm.name
def test_real_arch_causal_lm_by_path_gets_a_fresh_projector_and_trains(world, tmp_path):
    from cycle.lvlm import align_projector, build_lvlm, load_lvlm

    cfg = cfg_for(world, f"lvlm.lm.name={world['qwen']}")
    out = build_lvlm(world["clip32"], str(world["qwen"]), cfg.lvlm, tmp_path / "base", device="cpu")
    model, processor = load_lvlm(out)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    lm = load_file(str(world["qwen"] / "model.safetensors"))
    ours = model.state_dict()
    for k in ("layers.0.self_attn.q_proj.bias", "layers.1.mlp.down_proj.weight", "embed_tokens.weight"):
        theirs = lm["model." + k]  # the embeddings may have grown to the tokenizer's length: compare their rows
        assert torch.equal(ours["model.language_model." + k][: len(theirs)], theirs), k
    assert ours["model.language_model.embed_tokens.weight"].shape[0] == len(processor.tokenizer)
    assert render_input(processor, "p") == "<image>\np\nanswer:"  # our fixed format for a bare LM
    aligned, metrics = align_projector(
        out, world["store"], world["sv"], world["tv"], cfg, tmp_path / "al", progress=False
    )
    assert metrics["align/loss_after"] < metrics["align/loss_before"]


def test_real_arch_image_text_to_text_models_are_refused_with_the_teacher_route(world, tmp_path):
    from transformers import Qwen2VLConfig

    from cycle.errors import HQClipError
    from cycle.lvlm import build_lvlm

    vl = tmp_path / "qwen2-vl"
    Qwen2VLConfig(
        text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 600},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
    ).save_pretrained(vl)
    for key in (f"lvlm.base={vl}", f"lvlm.lm.name={vl}"):
        cfg = cfg_for(world, key)
        with pytest.raises(HQClipError, match="qwen2_vl.*annotate.backend=openai.*annotate.backend=vllm"):
            build_lvlm(world["clip32"], str(vl), cfg.lvlm, tmp_path / "x", device="cpu")
    cfg = cfg_for(world, f"lvlm.lm.name={world['base']}")
    with pytest.raises(HQClipError, match="is a LLaVA: name it with lvlm.base"):
        build_lvlm(world["clip32"], str(world["base"]), cfg.lvlm, tmp_path / "y", device="cpu")
    cfg = cfg_for(world, f"lvlm.base={world['qwen']}")
    with pytest.raises(HQClipError, match="without vision: name a causal LM with lvlm.lm.name"):
        build_lvlm(world["clip32"], "", cfg.lvlm, tmp_path / "z", device="cpu")
    with pytest.raises(ConfigError, match="'lvlm.base'.*set one of them"):
        load_config(TINY_YAML, [f"lvlm.base={world['base']}", f"lvlm.lm.name={world['qwen']}"])
    assert not any((tmp_path / n).exists() for n in "xyz")


# ----------------------------------------------------------------------------------------------- guards
def test_real_arch_quickgelu_weights_into_a_gelu_model_are_refused_offline():
    from cycle.clip.model import UnknownArchitectureError, create_clip

    for tag in ("openai", "dfn2b", "metaclip_fullcc"):
        with pytest.raises(ConfigError, match=f"'{tag}' weights of ViT-B-16.*clip.name=ViT-B-16-quickgelu"):
            load_config(TINY_YAML, ["clip.name=ViT-B-16", f"clip.pretrained={tag}"])
    load_config(TINY_YAML, ["clip.name=ViT-B-16-quickgelu", "clip.pretrained=openai"])  # the right name
    load_config(TINY_YAML, ["clip.name=ViT-B-16", "clip.pretrained=laion2b_s34b_b88k"])  # a GELU tag
    with pytest.raises(UnknownArchitectureError, match="ViT-B-16-quickgelu"):
        create_clip("ViT-B-16", pretrained="openai")  # refused before any download


def test_real_arch_launcher_args_and_world_size(monkeypatch, tmp_path):
    from cycle.cli import main

    result = CliRunner().invoke(main, ["run", "tiny", "--local_rank=0", "--dry-run", f"root={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert "gen 1: lm -> lvlm -> align -> sft -> annotate -> train -> eval" in result.output
    result = CliRunner().invoke(main, ["run", "tiny", "--local_rank", "1", "--dry-run", f"root={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "tiny").exists()  # a dry run writes nothing
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match=r"train.world_size.*WORLD_SIZE=2.*train.world_size=2"):
        load_config(TINY_YAML)
    assert load_config(TINY_YAML, ["train.world_size=2"]).train.world_size == 2
    result = CliRunner().invoke(main, ["run", "tiny", "--local_rank=0", "--dry-run"])
    assert result.exit_code == 2 and "WORLD_SIZE=2" in result.output


# ----------------------------------------------------------------------------------------------- real configs, dry run
REAL_CONFIGS = ("real-vitb16", "real-7b-80gb")


def test_real_arch_shipped_real_configs_load_offline_within_token_budgets():
    from cycle.cli_common import config_file
    from cycle.config import sft_adapter_only

    budget = json.loads((TINY_YAML.parents[1] / "benchmarks" / "results" / "token_budget.json").read_text())["budget"]
    for name in REAL_CONFIGS:
        cfg = load_config(config_file(name))
        assert cfg.data.source == "store" and cfg.lvlm.lora.enabled and cfg.lvlm.dtype == "bf16"
        assert cfg.annotate.backend == "vllm" and sft_adapter_only(cfg.lvlm)
        llama = cfg.lvlm.base.startswith("llava-hf/llava-1.5")
        suffix = " (Llama-2 tokenizer)" if llama else ""
        assert cfg.annotate.max_new_tokens >= budget["annotate.max_new_tokens" + suffix], name
        assert cfg.lvlm.lm.max_length >= budget["lvlm.lm.max_length" + suffix], name
    assert load_config(config_file("real-vitb16")).lvlm.lm.name == "Qwen/Qwen2.5-1.5B-Instruct"
    assert load_config(config_file("real-7b-80gb")).gpu_memory_gb == 80


def test_real_arch_dry_run_of_the_shipped_configs_fits_and_refuses_a_small_gpu(tmp_path):
    from cycle.cli import main

    for name in REAL_CONFIGS:
        result = CliRunner().invoke(main, ["run", name, "--dry-run", f"root={tmp_path}"])
        assert result.exit_code == 0, result.output
        out = result.output
        assert "gen 0: data -> train -> eval" in out and "gen 2: lvlm -> align" in out
        for stage in ("train", "align", "sft", "annotate", "eval"):
            assert f"\n  {stage} " in out
        assert (
            " NO " not in out and "lvlm/sft (adapter + projector)" in out and "(the other way: lvlm/sft (merged" in out
        )
    result = CliRunner().invoke(main, ["run", "real-7b-80gb", "--dry-run", "--gpu-memory-gb", "16"])
    assert result.exit_code == 2 and "GB GPU" in result.output and "error: stage '" in result.output
    assert not (tmp_path / "real-vitb16").exists()


def test_real_arch_plan_counts_parameters_like_the_built_models(world):
    import open_clip
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from cycle.clip.model import create_clip
    from cycle.plan import clip_shape, lm_shape_from_config

    for name in ("hqclip-micro", "test-vitb16-w32", "ViT-B-16"):
        model = create_clip(name)[0] if name != "ViT-B-16" else open_clip.create_model("ViT-B-16")
        shape = clip_shape(name)
        assert shape.params() == sum(p.numel() for p in model.parameters()), name
        assert shape.vision_params() == sum(
            p.numel() for n, p in model.named_parameters() if n.startswith("visual.")
        ) - (model.visual.proj.numel())
    qwen = AutoModelForCausalLM.from_pretrained(world["qwen"])
    shape = lm_shape_from_config(json.loads((world["qwen"] / "config.json").read_text()))
    assert shape.params() == sum(p.numel() for p in qwen.parameters())
    llava = LlavaForConditionalGeneration.from_pretrained(world["base"])
    shape = lm_shape_from_config(json.loads((world["base"] / "config.json").read_text()))
    lm_params = sum(p.numel() for n, p in llava.named_parameters() if "language_model" in n or "lm_head" in n)
    assert shape.params() == lm_params
