"""The training loop of one rank: batches -> texts and crops -> accumulated forward/backward -> step.

Owns the step boundary (DeepSpeed runs with `managed_gradient_accumulation: false`), the learning rate
(a pure function of the step, so nothing but the step needs restoring), the logit-scale clamp, the
JSONL log, the progress bar and the checkpoint cadence.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import torch

from . import checkpoint
from .augment import random_resized_crop
from .loss import reduce_for_logging
from .optim import clamp_logit_scale, cosine_lr, set_lr
from .step import forward_backward, split_micro_batches


class JsonlLog:
    """`log.jsonl`, one line per logged step. A resumed run first drops the lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill: everything after it is gone too
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()


def _text_counts(stats: Counter, world_size: int) -> dict:
    names = ["samples", "long_text", "neg_desc", "neg_tags", "neg_same_as_pos", "truncated"]
    values = torch.tensor([float(stats.get(k, 0)) for k in names], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(values)
    counts = dict(zip(names, values.tolist()))
    n = max(counts["samples"], 1.0)
    return {"long_text_share": counts["long_text"] / n,
            "neg_share": (counts["neg_desc"] + counts["neg_tags"] - counts["neg_same_as_pos"]) / n,
            "truncated_texts": int(counts["truncated"])}


def make_inputs(batch: dict, drawer, step: int, seed: int, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """Model/loss tensors of one collated batch, and the text-draw stats."""
    texts = drawer(batch, step)
    stats = texts.pop("stats")
    images = random_resized_crop(batch["image"], batch["id"], seed, step)
    inputs = {"images": images.to(device=device, dtype=dtype)}
    inputs.update({k: v.to(device) for k, v in texts.items()})
    return inputs, stats


def run_loop(job, engine, optimizer, loss_fn, drawer, info, ckpt_root: Path, resumed, bf16: bool) -> None:
    from tqdm.auto import tqdm

    from ..data.loader import make_loader
    from ..data.sampler import ResumableSampler

    cfg, plan = job.cfg, job.plan
    sampler = ResumableSampler(plan.num_samples, seed=cfg.train.seed, drop_last=True, batch_size=plan.global_batch,
                               rank=info.rank, world_size=info.world_size)
    step = 0
    if resumed is not None:
        step = int(resumed["step"])
        sampler.load_state_dict(resumed["sampler"])
        sampler.set_epoch(step // plan.steps_per_epoch)
        where = (step // plan.steps_per_epoch, (step % plan.steps_per_epoch) * plan.global_batch)
        if (sampler.epoch, sampler.position) != where:
            raise checkpoint.ResumeError(f"checkpoint at step {step} has sampler state {resumed['sampler']}, "
                                         f"expected epoch {where[0]} position {where[1]}")
    loader = make_loader(job.dataset, sampler=sampler, num_workers=cfg.data.num_workers)
    logfile = JsonlLog(job.out_dir / "log.jsonl", step, info.is_main)
    if step == 0:
        logfile.write({"event": "start", "step": 0, "plan": vars(plan), "notes": job.notes,
                       "hni_weight": job.hni_weight, "stc_weight": job.stc_weight, "tag_vocab_size": len(job.tag_vocab)})
    elif step < plan.total_steps:
        logfile.write({"event": "resume", "step": step})
    dtype = torch.bfloat16 if bf16 else torch.float32
    logit_scale = engine.module.clip.logit_scale

    def backward(loss):
        engine.backward(loss, scale_wrt_gas=False)

    bar = tqdm(total=plan.total_steps, initial=step, desc="train clip", unit="step", dynamic_ncols=True,
               disable=not (job.progress and info.is_main))
    window_start, window_steps, text_stats = time.perf_counter(), 0, Counter()
    try:
        while step < plan.total_steps:
            sampler.set_epoch(step // plan.steps_per_epoch)
            for batch in loader:
                lr = cosine_lr(step, cfg.train.lr, cfg.train.warmup_steps, plan.total_steps)
                set_lr(optimizer, lr)
                inputs, stats = make_inputs(batch, drawer, step, cfg.train.seed, engine.device, dtype)
                text_stats.update(stats)
                losses = forward_backward(engine, loss_fn, split_micro_batches(inputs, plan.micro_batch), backward)
                engine.step()
                clamp_logit_scale(logit_scale)
                step += 1
                window_steps += 1
                terms = reduce_for_logging(losses, info.world_size)
                terms["loss"] = sum(terms.values())
                elapsed = time.perf_counter() - window_start
                rate = window_steps * plan.global_batch / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in terms.items()} | {"img/s": f"{rate:.0f}"})
                if step % cfg.train.log_every == 0 or step == plan.total_steps:
                    record = {"step": step, "epoch": (step - 1) // plan.steps_per_epoch, "lr": lr, **terms,
                              "logit_scale": float(logit_scale.detach().float().exp().reshape(-1)[0]),
                              "samples_per_s": rate, **_text_counts(text_stats, info.world_size)}
                    logfile.write(record)
                    window_start, window_steps, text_stats = time.perf_counter(), 0, Counter()
                if step % cfg.train.checkpoint_every == 0 or step == plan.total_steps:
                    checkpoint.save(engine, ckpt_root, step, {"step": step, "sampler": sampler.state_dict()}, info)
                if step >= plan.total_steps:
                    break
    finally:
        bar.close()

