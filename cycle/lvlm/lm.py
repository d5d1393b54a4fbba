"""The LLaVA's language model.

At real scale `lvlm.lm.name` names any Hugging Face causal LM (hub name or local path; an instruct model
such as Qwen2.5-7B-Instruct): `prepare_lm` hands the name on and `build_lvlm` loads it with
`AutoModelForCausalLM` + `AutoTokenizer`. The embedded default, `name: tiny`, is a Llama-style LM built
here: a byte-level BPE tokenizer trained on the run's text (`tokenizer.py`) and a small `LlamaConfig` LM
pretrained briefly on the same text, so that SFT later only has to teach it to look at the image.
With `lvlm.base` (an existing LLaVA) there is no LM to prepare: the lm stage records the base's name and
`build_lvlm` takes the LM from it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..annotate.schema import FORMULA_KEYS, build_prompt, model_input, to_target_json
from ..config import LMConfig, RunConfig
from ..device import resolve_device
from ..store import Store
from .common import LVLMError, finish, seed_everything, staging_dir, train_loop
from .data import Example, emoji_alt_text_fn, samples_by_id
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)

VARIANT_SEED_OFFSET = 7919  # seed variants of the pretraining text draw other noise than SFT's epochs (a prime)
FFN_MULT = 4  # Llama-style MLP width: intermediate = 4 x hidden
MIN_POSITIONS = 256  # position table at least this long, so inputs a little over max_length still fit
LENGTH_WINDOW_BATCHES = 32  # batches per length-sorting window: similar lengths, still a random mix
EPOCH_SEED_STRIDE = 1000  # epoch e of seed s orders batches with s * 1000 + e (distinct per (s, e))
PRETRAIN_WARMUP_STEPS = 50  # at most; fewer when an epoch has fewer steps
PRETRAIN_WEIGHT_DECAY = 0.01


def run_texts(
    store: Store, samples_version: int | str | None, teacher_version: int | str | None, cfg: Optional[RunConfig] = None
) -> Iterator[str]:
    """The run's text the tiny LM learns from: every training alt-text, and for each seed row of the
    training split the whole model input (prompt with its alt-text) followed by the teacher's answer
    JSON, as SFT will show it. Lazy: nothing is read until iterated (a hub LM never iterates it).

    With `cfg` on emoji-scenes data, each seed sequence also comes `lvlm.lm.pretrain_seed_variants` more
    times with fresh noisy alt-text: text where the answer must be read, copied and repaired from the
    reference, which a tiny LM trained from scratch otherwise barely learns (an LM pretrained elsewhere
    already can).
    """
    for batch in store.scan("samples", ["alt_text"], "split = 'train'", version=samples_version):
        yield from (a for a in batch.column("alt_text").to_pylist() if a)
    variants, fresh = 0, None
    if cfg is not None and cfg.data.source == "emoji-scenes" and cfg.lvlm.lm.pretrain_seed_variants > 0:
        variants = cfg.lvlm.lm.pretrain_seed_variants
        fresh = emoji_alt_text_fn(cfg.data.emoji, seed=cfg.seed + VARIANT_SEED_OFFSET)
    seeds = store.read("teacher", ["id", *FORMULA_KEYS], version=teacher_version).to_pylist()
    rows = samples_by_id(store, samples_version, [r["id"] for r in seeds], columns=("id", "alt_text", "split", "meta"))
    for rec in seeds:
        row = rows.get(rec["id"])
        if row is None or row["split"] != "train":
            continue
        target = to_target_json(rec)
        yield model_input(build_prompt(row["alt_text"])) + target
        example = Example(row["id"], b"", row["alt_text"] or "", target, meta=row["meta"])
        for k in range(1, variants + 1):
            alt = fresh(example, k)
            if alt is not None:
                yield model_input(build_prompt(alt)) + target


def tiny_lm_config(cfg: LMConfig, tokenizer) -> LlamaConfig:
    """The Llama config of the tiny LM (`lvlm.lm.*`, checked by `cycle.config`)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=FFN_MULT * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=max(cfg.max_length, MIN_POSITIONS),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _length_grouped(ids: list[list[int]], batch_size: int, gen: torch.Generator) -> list[list[int]]:
    """Shuffled batches of similar lengths: short alt-texts and long seed sequences mixed in one batch
    would be mostly padding. Sort within random windows of batches, then shuffle the batches."""
    order = torch.randperm(len(ids), generator=gen).tolist()
    window = LENGTH_WINDOW_BATCHES * batch_size
    groups = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: len(ids[i]))
        groups += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    return [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]


def _text_batches(ids: list[list[int]], batch_size: int, pad_id: int, seed: int):
    def batches(epoch: int):
        gen = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        for group in _length_grouped(ids, batch_size, gen):
            rows = [ids[i] for i in group]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}

    return batches


def pretrain_lm(
    cfg: LMConfig, texts: Iterable[str], out_dir: str | Path, seed: int = 0, device: str = "cpu", progress: bool = True
) -> Path:
    """Train the tiny LM's tokenizer and pretrain the LM on `texts`; save both as one HF directory.

    Always trains: whether an existing `out_dir` may be reused is the caller's (the controller's) call.
    `out_dir` is replaced atomically; its `info.json` holds the epoch losses and sizes.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LVLMError("prepare_lm: no text to train the tiny LM's tokenizer on (empty samples and seed?)")
    seed_everything(seed)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model = LlamaForCausalLM(tiny_lm_config(cfg, tokenizer))
    dev = resolve_device(device)
    model.to(dev)
    ids = [enc[: cfg.max_length - 1] + [tokenizer.eos_token_id] for enc in tokenizer(texts).input_ids]
    # every length window holds whole batches, so an epoch has ceil(n / batch_size) of them
    steps = math.ceil(len(ids) / cfg.batch_size)
    losses = train_loop(
        model,
        list(model.parameters()),
        _text_batches(ids, cfg.batch_size, tokenizer.pad_token_id, seed),
        cfg.pretrain_epochs,
        steps,
        cfg.pretrain_lr,
        warmup=min(PRETRAIN_WARMUP_STEPS, steps),
        device=dev,
        desc="pretrain tiny LM",
        progress=progress,
        weight_decay=PRETRAIN_WEIGHT_DECAY,
    )
    tmp = staging_dir(out_dir)
    model.to("cpu").save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    log.info("tiny LM pretrained on %d texts: epoch losses %s", len(texts), [round(x, 4) for x in losses])
    return finish(
        tmp,
        out_dir,
        {
            "epoch_losses": losses,
            "texts": len(texts),
            "seed": seed,
            "tokens": sum(len(i) for i in ids),
            "vocab": len(tokenizer),
        },
    )


def prepare_lm(
    cfg: LMConfig, texts: Iterable[str], out_dir: str | Path, seed: int = 0, progress: bool = True, device: str = "cpu"
) -> Path | str:
    """The LM directory for `build_lvlm`: `cfg.name == "tiny"` pretrains one into `out_dir` (`pretrain_lm`,
    every call); any other name is an HF model name or path and is returned unchanged (`texts` unread)."""
    if cfg.name != "tiny":
        return cfg.name
    return pretrain_lm(cfg, texts, out_dir, seed=seed, device=device, progress=progress)
