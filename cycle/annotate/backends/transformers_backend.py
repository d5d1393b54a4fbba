"""In-process batched generation with transformers: a merged LLaVA directory on CPU or GPU.

Prompts are left-padded so every sequence ends at the same position and the KV cache serves the whole
batch; greedy by default (the format is learned, sampling only adds defects), sampling for retries.

Sampling seeds torch's global generator: `generate` has no generator argument (it draws with
`torch.multinomial` on the default one), so a retry with `seed` calls `torch.manual_seed(seed)` first,
explicitly (`_seed_sampling`). Later unseeded draws in the process continue from that state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ...device import resolve_device
from ..schema import IMAGE_TOKEN, render_input
from .base import BackendError, BatchItem, FailedGeneration, dir_fingerprint, to_pil


def _seed_sampling(seed: Optional[int]) -> None:
    """Seed the global torch generator that HF `generate` samples from (it takes no generator)."""
    if seed is not None:
        torch.manual_seed(seed)


class TransformersBackend:
    """`LlavaForConditionalGeneration` + `AutoProcessor` loaded from `model_dir` (an HF LLaVA directory)."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        max_new_tokens: int = 96,
        temperature: float = 0.0,
        min_new_tokens: int = 0,
        dtype: Optional[torch.dtype] = None,
        kv_cache: str = "dynamic",
        lora_dir: Optional[str | Path] = None,
    ):
        """`lora_dir`: a peft adapter over `model_dir` (SFT's adapter-only output), merged in memory."""
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model_dir = Path(model_dir) if model_dir else None
        if model_dir is None or not (model_dir / "config.json").is_file():
            raise BackendError(
                f"annotator model directory '{model_dir}' has no config.json "
                "(expected a merged LlavaForConditionalGeneration directory)"
            )
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).to(self.device)
            self.processor = AutoProcessor.from_pretrained(model_dir)
            if lora_dir is not None:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, str(lora_dir)).merge_and_unload()
        except (OSError, ValueError, KeyError) as err:
            raise BackendError(f"annotator model '{model_dir}' does not load: {str(err).splitlines()[0]}") from err
        self.model.eval()
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # new tokens of every row start at the same position
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_token = getattr(self.processor, "image_token", None) or IMAGE_TOKEN
        self.max_new_tokens, self.min_new_tokens, self.temperature = max_new_tokens, min_new_tokens, temperature
        self.kv_cache = kv_cache  # "dynamic" or "static": `annotate.kv_cache`, checked by cycle.config
        adapter = f"+lora:{dir_fingerprint(lora_dir)}" if lora_dir is not None else ""
        self.fingerprint = f"transformers:{model_dir.name}:{dir_fingerprint(model_dir)}{adapter}"
        self.generated_tokens = 0  # running count, for throughput figures

    @torch.inference_mode()
    def generate(
        self,
        batch: Sequence[BatchItem],
        seed: Optional[int] = None,
        temperature: Optional[float] = None,
        keys: Optional[Sequence[str]] = None,
    ) -> list[str]:
        outputs: list[str] = [FailedGeneration("not generated")] * len(batch)
        images, texts, where = [], [], []
        for i, (image, prompt) in enumerate(batch):
            try:
                images.append(to_pil(image))
            except ValueError as err:  # one bad image fails its row, not the batch
                outputs[i] = FailedGeneration(str(err))
                continue
            texts.append(render_input(self.processor, prompt))
            where.append(i)
        if not where:
            return outputs
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        temperature = self.temperature if temperature is None else temperature
        sample = temperature > 0
        _seed_sampling(seed)
        gen = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens or None,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **({"cache_implementation": "static"} if self.kv_cache == "static" else {}),
        )
        new = gen[:, inputs["input_ids"].shape[1] :]
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.generated_tokens += int(((new != pad) & (new != eos)).sum()) if pad != eos else int((new != pad).sum())
        self.last_token_ids = [[t for t in row if t not in (pad, eos)] for row in new.tolist()]
        decoded = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(where, decoded):
            outputs[i] = text
        return outputs

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
