"""vLLM for annotation at scale: offline `vllm.LLM` in a worker process, or a vLLM OpenAI server.

- `offline`: `vllm_worker.py` runs in the Python named by `annotate.vllm.python` (vLLM lives in its own
  environment: its torch pins clash with this one; `scripts/build_vllm_cpu_env.sh` builds the CPU one),
  loaded once and fed batches as JSON lines over pipes. Structured output keeps every answer inside the
  four-formula JSON schema; a LoRA adapter directory is served with `LoRARequest`.
- `server`: an already running `vllm serve` is an OpenAI-compatible endpoint: the `openai` backend's
  code does the talking (`annotate.openai.base_url` / `.model` name it; it needs a chat template).

The checkpoint is prepared once per model: vLLM reads the tower as `vision_tower.vision_model.*`
(`cycle.lvlm.weights`, the one home of that rename; directories written by `save_lvlm` already have it,
so their prepared copy is hard links, not a second copy of the weights).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from ...lvlm.weights import rewrite_keys
from ..schema import FORMULA_JSON_SCHEMA, IMAGE_TOKEN, model_input, render_input
from .base import BackendError, BatchItem, FailedGeneration, dir_fingerprint, to_png_bytes

WORKER = Path(__file__).with_name("vllm_worker.py")
SOURCE_STAMP = ".source"  # in a prepared copy: the fingerprint of the directory it was made from
STARTUP_TIMEOUT_S = 900.0  # loading and compiling a model in vLLM takes minutes, on a CPU many
BATCH_TIMEOUT_S = 3600.0  # one batch: generous, a hung worker still ends the pass
LOG_TAIL_CHARS = 3000  # of the worker's log, quoted in the error when it dies


def prepare_vllm_model(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of the HF LLaVA directory whose vision-tower keys vLLM can load; reused when up to date. Files
    are hard-linked where possible (a key rewrite replaces a file, never writes into it)."""
    from ...lvlm.common import finish, staging_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    stamp = dir_fingerprint(model_dir)
    if (out_dir / SOURCE_STAMP).is_file() and (out_dir / SOURCE_STAMP).read_text() == stamp:
        return out_dir
    tmp = staging_dir(out_dir)
    for f in model_dir.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:  # another filesystem
                shutil.copy2(f, tmp / f.name)
    rewrite_keys(tmp)
    (tmp / SOURCE_STAMP).write_text(stamp)
    return finish(tmp, out_dir)


def _lora_rank(lora_dir: Optional[str | Path]) -> Optional[int]:
    """The adapter's rank (peft's adapter_config.json), for vLLM's `max_lora_rank`; None without one."""
    config = Path(lora_dir) / "adapter_config.json" if lora_dir else None
    return int(json.loads(config.read_text())["r"]) if config and config.is_file() else None


def _chat_processor(model_dir: str | Path):
    """The model's processor when its chat template is not our fixed format (a LLaVA built on a base
    checkpoint): prompts are rendered with it, as SFT rendered them; None keeps `model_input`."""
    from transformers import AutoProcessor

    from ...lvlm.assemble import CHAT_TEMPLATE

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return None
    template = getattr(processor, "chat_template", None)
    return processor if template and template != CHAT_TEMPLATE else None


class VLLMBackend:
    def __init__(
        self,
        cfg: Any,
        model_dir: Optional[str | Path],
        lora_dir: Optional[str | Path] = None,
        out_dir: Optional[str | Path] = None,
        structured: bool = True,
        min_new_tokens: int = 0,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        device: str = "auto",
        logprobs: int = 0,
        schema: Optional[dict] = None,
        dtype: str = "auto",
    ):
        """`cfg` is an `AnnotateConfig`. `structured=False` leaves decoding unconstrained (also settable per
        call through the `structured` attribute); `schema` replaces the four-formula JSON schema;
        `logprobs=k` keeps the top-k log-probabilities of every generated token in `last_logprobs`; `dtype`
        is vLLM's ("auto": bfloat16 on a CPU, the checkpoint's on a GPU)."""
        self.inner = None
        self.proc = None
        self.generated_tokens = 0
        vcfg = cfg.vllm
        weights = dir_fingerprint(model_dir) if model_dir and Path(model_dir).is_dir() else "served"
        adapter = dir_fingerprint(lora_dir) if lora_dir else "none"
        if vcfg.mode == "server":
            from .openai_backend import OpenAIBackend

            log = Path(out_dir) / "requests.jsonl" if out_dir else None
            self.inner = OpenAIBackend(
                cfg.openai,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                request_log=log,
                use_schema=structured,
            )
            self.fingerprint = f"vllm-server:{cfg.openai.model}:{weights}:{adapter}"
            return
        if not model_dir or not (Path(model_dir) / "config.json").is_file():
            raise BackendError(f"annotator model directory '{model_dir}' has no config.json")
        out_dir = Path(out_dir) if out_dir else Path(model_dir).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        served = prepare_vllm_model(model_dir, out_dir / "vllm-model")
        self.processor = _chat_processor(model_dir)
        self.temperature, self.structured = cfg.temperature, structured
        self.fingerprint = f"vllm:{Path(model_dir).name}:{weights}:{adapter}"
        python = vcfg.python or sys.executable
        if not Path(python).exists() and shutil.which(python) is None:
            raise BackendError(
                f"annotate.vllm.python '{python}' does not exist (build one with scripts/build_vllm_cpu_env.sh)"
            )
        worker_cfg = {
            "model": str(served),
            "lora": str(lora_dir) if lora_dir else None,
            "max_lora_rank": _lora_rank(lora_dir),
            "max_new_tokens": cfg.max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "max_num_seqs": vcfg.max_num_seqs,
            "tensor_parallel_size": vcfg.tensor_parallel_size,
            "gpu_memory_utilization": vcfg.gpu_memory_utilization,
            "cpu_memory_utilization": vcfg.cpu_memory_utilization,
            "device": device,
            "schema": schema or FORMULA_JSON_SCHEMA,
            "logprobs": logprobs,
            "dtype": dtype,
        }
        (out_dir / "vllm-worker.json").write_text(json.dumps(worker_cfg, indent=1))
        self.log_path = out_dir / "vllm-worker.log"
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [python, str(WORKER), str(out_dir / "vllm-worker.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        hello = self._read(startup_timeout_s, "start")
        if not hello.get("ready"):
            self.close()
            raise BackendError(f"vLLM worker did not start: {hello}")
        self.vllm_version = hello.get("vllm")

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read(self, timeout: float, what: str) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = "timeout"
        if line is None or line == "timeout":
            tail = self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if self.log_path.exists() else ""
            self.close()
            raise BackendError(
                f"vLLM worker {'timed out' if line else 'exited'} during {what}; "
                f"its log ({self.log_path}) ends:\n{tail}"
            )
        return json.loads(line)

    def generate(
        self,
        batch: Sequence[BatchItem],
        seed: Optional[int] = None,
        temperature: Optional[float] = None,
        keys: Optional[Sequence[str]] = None,
    ) -> list[str]:
        if self.inner is not None:
            return self.inner.generate(batch, seed=seed, temperature=temperature, keys=keys)
        outputs: list[str] = [FailedGeneration("not generated")] * len(batch)
        prompts, images, where = [], [], []
        for i, (image, prompt) in enumerate(batch):
            try:
                data, _ = to_png_bytes(image)
            except ValueError as err:
                outputs[i] = FailedGeneration(str(err))
                continue
            prompts.append(render_input(self.processor, prompt) if self.processor else model_input(prompt, IMAGE_TOKEN))
            images.append(base64.b64encode(data).decode())
            where.append(i)
        if not where:
            return outputs
        temperature = self.temperature if temperature is None else temperature
        self.proc.stdin.write(
            json.dumps(
                {
                    "prompts": prompts,
                    "images": images,
                    "seed": seed,
                    "temperature": temperature,
                    "structured": self.structured,
                }
            )
            + "\n"
        )
        self.proc.stdin.flush()
        reply = self._read(BATCH_TIMEOUT_S, "generation")
        if "error" in reply:
            raise BackendError(f"vLLM worker failed on a batch: {reply['error']} (log: {self.log_path})")
        self.generated_tokens += reply.get("tokens", 0)
        self.last_token_ids = reply.get("token_ids")
        self.last_prompt_token_ids = reply.get("prompt_token_ids")
        self.last_logprobs = reply.get("logprobs")
        for i, text in zip(where, reply["outputs"]):
            outputs[i] = text
        return outputs

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()
            self.proc = None
