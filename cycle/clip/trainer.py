"""One rank's CLIP training: the `Trainer` (state and loop) and `forward_backward` (feature-cache accumulation).

Modelled on torchtitan's `Trainer` (`train` / `train_step` / `forward_backward_step`) and open_clip's
`train_one_epoch`. One optimizer step: a collated batch -> texts and crops drawn per (seed, step, sample)
-> `forward_backward` over micro-batches -> `engine.step()` -> logit-scale clamp. DeepSpeed runs with
`managed_gradient_accumulation: false`, so the trainer owns the step boundary. The learning rate is a
pure function of the step: a resume restores the engine, the RNGs, the step and the sampler position
(see `checkpoint`), nothing else of the loop.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..files import write_text_atomic
from ..schedule import cosine_lr
from . import checkpoint, dist
from .augment import random_resized_crop
from .loss import HQClipLoss, reduce_for_logging
from .model import FEATURE_KEYS, ClipWithTagHead, TextTagHead, create_clip, encode_text
from .optim import clamp_logit_scale, deepspeed_config, make_optimizer, set_lr
from .saved import save_clip
from .text import TextDrawer

# A rank keeps the items it has read (decoded images and texts) up to this many pixel bytes, so later epochs skip
# the store and the decoding: the demo's 4,000 images take 49 MB; past the bound the rest is read every epoch.
ITEM_CACHE_BYTES = 256 << 20
# Per-sample inputs the loss reads directly (not through the model).
LOSS_INPUT_KEYS = ("neg_valid", "text_keys", "neg_keys", "tag_targets")
# The text draws' counters summed over ranks into each log line's shares.
TEXT_COUNT_KEYS = (
    "samples",
    "long_text",
    "short_text",
    "neg_desc",
    "neg_tags",
    "neg_same_as_pos",
    "neg_too_far",
    "neg_repaired",
    "truncated",
)


def train_rank(job) -> None:
    """One rank's whole run (what `dist.launch` starts): process group, `Trainer`, resume, train, save."""
    from ..device import resolve_device

    info = dist.DistInfo.current()
    device = resolve_device(job.cfg.device, info.local_rank)
    created = dist.init_process_group(device)
    try:
        trainer = Trainer(job, info, device)
        trainer.resume()
        trainer.train()
        trainer.save_model()
    finally:
        if created:
            dist.shutdown()


@dataclass
class _Window:
    """What the next log line covers: the steps since the last one."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    text_stats: Counter = field(default_factory=Counter)


class Trainer:
    """The state of one rank's training (engine, optimizer, loss, text drawer, sampler, step) and its loop.

    `job` is a `train.TrainJob` (config, plan, dataset, loss weights, tag vocabulary); `device` the rank's.
    """

    def __init__(self, job, info: dist.DistInfo, device: torch.device):
        import deepspeed

        from ..data.loader import PairDataset, make_loader
        from ..data.sampler import ResumableSampler

        cfg, plan = job.cfg, job.plan
        self.job, self.cfg, self.plan, self.info = job, cfg, plan, info
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (and rank 0's are broadcast)
        clip, _, preprocess_val, tokenizer = create_clip(cfg.clip.name, pretrained=job.init_clip or cfg.clip.pretrained)
        module = ClipWithTagHead(
            clip,
            num_tags=len(job.tag_vocab) if job.stc_weight else 0,
            head=cfg.loss.stc_head,
            tag_tokens=tokenizer(job.tag_vocab) if job.stc_weight and cfg.loss.stc_head == "text" else None,
        )
        module.init_tag_prior(job.tag_prior or job.tag_positive_rate)
        if module.stc_head is not None and job.stc_head_init is not None:
            prev = job.stc_head_init
            if not module.carry_over_head(prev["state"], prev["tag_vocab"], job.tag_vocab):
                job.notes.append(f"STC head: {prev['from']}'s head is of another kind or width; not carried over")
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=make_optimizer(module, cfg.train),
            config=deepspeed_config(cfg.train, plan.micro_batch, plan.accum_steps, plan.world_size, self.bf16),
        )
        self.logit_scale = module.clip.logit_scale
        self.loss_fn = HQClipLoss(
            cfg.loss, rank=info.rank, world_size=info.world_size, hni_weight=job.hni_weight, stc_weight=job.stc_weight
        )
        self.drawer = TextDrawer(
            cfg.loss,
            tokenizer,
            seed=cfg.train.seed,
            use_annotations=job.use_annotations,
            negatives=self.loss_fn.uses_negatives,
            tag_vocab=job.tag_vocab if self.loss_fn.uses_tags else None,
            context_length=getattr(clip, "context_length", None),
            neighbours=job.neighbours,
        )
        self.sampler = ResumableSampler(
            plan.num_samples,
            seed=cfg.train.seed,
            drop_last=True,
            batch_size=plan.global_batch,
            rank=info.rank,
            world_size=info.world_size,
            shards=plan.shards,
        )
        # This rank's rows only; the transform is deterministic (the random crops are drawn per sample later).
        dataset = PairDataset(
            **job.data, transform=preprocess_val, row_range=self.sampler.owned_rows, cache_bytes=ITEM_CACHE_BYTES
        )
        self.loader = make_loader(dataset, sampler=self.sampler, num_workers=cfg.data.num_workers)
        self.checkpoints = job.out_dir / "checkpoints"
        self.step = 0
        self.window = _Window()
        self.log: JsonlLog | None = None  # opened by `train`, once `resume` knows the step to cut it at

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        """Steps to `plan.total_steps`: a log line every `train.log_every`, a checkpoint every `checkpoint_every`."""
        from tqdm.auto import tqdm

        plan = self.plan
        self.log = JsonlLog(self.job.out_dir / "log.jsonl", self.step, self.info.is_main)
        if self.step == 0:
            self.log.write(
                {
                    "event": "start",
                    "step": 0,
                    "plan": vars(plan),
                    "notes": self.job.notes,
                    "hni_weight": self.job.hni_weight,
                    "stc_weight": self.job.stc_weight,
                    "tag_vocab_size": len(self.job.tag_vocab),
                    "stc_head": self.cfg.loss.stc_head if self.job.stc_weight else None,
                    # per generation: shares of the annotations' aligned negative parts that are identical
                    # to their positive, or too far from it to be a minimal edit (loss.neg_max_edit_words)
                    "negatives": self.job.negative_stats,
                }
            )
        elif self.step < plan.total_steps:
            self.log.write({"event": "resume", "step": self.step})
        bar = tqdm(
            total=plan.total_steps,
            initial=self.step,
            desc="train clip",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.job.progress and self.info.is_main),
        )
        self.window = _Window()
        try:
            while self.step < plan.total_steps:
                self.sampler.set_epoch(self.step // plan.steps_per_epoch)
                for batch in self.loader:
                    lr, losses = self.train_step(batch)
                    terms = reduce_for_logging(losses, self.info.world_size)
                    terms["loss"] = sum(terms.values())
                    self._report(bar, lr, terms)
                    if self.step % self.cfg.train.checkpoint_every == 0 or self.step == plan.total_steps:
                        self.save_checkpoint()
                    if self.step >= plan.total_steps:
                        break
        finally:
            bar.close()

    def train_step(self, batch: dict) -> tuple[float, dict[str, Tensor]]:
        """One optimizer step on a collated batch; returns its learning rate and loss terms (detached)."""
        train = self.cfg.train
        lr = cosine_lr(self.step, train.lr, train.warmup_steps, self.plan.total_steps)
        set_lr(self.optimizer, lr)
        texts = self.drawer(batch, self.step)
        self.window.text_stats.update(texts.pop("stats"))
        inputs = {
            "images": random_resized_crop(batch["image"], batch["id"], train.seed, self.step).to(
                device=self.engine.device, dtype=self.dtype
            )
        }
        inputs.update({k: v.to(self.engine.device) for k, v in texts.items()})
        losses = self.forward_backward_step(inputs)
        self.engine.step()
        clamp_logit_scale(self.logit_scale)
        self.step += 1
        self.window.steps += 1
        return lr, losses

    def forward_backward_step(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch's gradients into the engine, micro-batch by micro-batch (no division by their count)."""
        return forward_backward(
            self.engine,
            self.loss_fn,
            split_micro_batches(inputs, self.plan.micro_batch),
            lambda loss: self.engine.backward(loss, scale_wrt_gas=False),
        )

    def _report(self, bar, lr: float, terms: dict[str, float]) -> None:
        """The progress bar every step; a log line (a collective: every rank calls this) on the cadence."""
        plan = self.plan
        rate = self.window.steps * plan.global_batch / max(time.perf_counter() - self.window.start, 1e-9)
        bar.update(1)
        bar.set_postfix({k.replace("_loss", ""): f"{v:.3f}" for k, v in terms.items()} | {"img/s": f"{rate:.0f}"})
        if self.step % self.cfg.train.log_every == 0 or self.step == plan.total_steps:
            self.log.write(
                {
                    "step": self.step,
                    "epoch": (self.step - 1) // plan.steps_per_epoch,
                    "lr": lr,
                    **terms,
                    "logit_scale": float(self.logit_scale.detach().float().exp().reshape(-1)[0]),
                    "samples_per_s": rate,
                    **text_counts(self.window.text_stats, self.info.world_size, self.engine.device),
                }
            )
            self.window = _Window()

    # ------------------------------------------------------------------------------------- state
    def save_checkpoint(self) -> None:
        checkpoint.save(
            self.engine,
            self.checkpoints,
            self.step,
            {"step": self.step, "sampler": self.sampler.state_dict()},
            self.info,
        )

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if there is one (else a fresh start at step 0)."""
        state = checkpoint.load(self.engine, self.checkpoints, self.info)
        if state is None:
            return
        step, spe = int(state["step"]), self.plan.steps_per_epoch
        self.sampler.load_state_dict(state["sampler"])
        self.sampler.set_epoch(step // spe)
        where = (step // spe, (step % spe) * self.plan.global_batch)
        if (self.sampler.epoch, self.sampler.position) != where:
            raise checkpoint.ResumeError(
                f"checkpoint at step {step} has sampler state {state['sampler']}, "
                f"expected epoch {where[0]} position {where[1]}"
            )
        self.step = step

    def save_model(self) -> Path:
        """Rank 0 writes `<out_dir>/model` from the optimizer's fp32 weights (gathered on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module, job = self.engine.module, self.job
        state = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective under ZeRO: every rank takes part
            state[name] = (full if full is not None else p.detach()).float().cpu()
        if self.info.is_main:
            clip = copy.deepcopy(module.clip).float().cpu() if self.bf16 else module.clip
            clip.load_state_dict(_strip(state, "clip."), strict=False)  # buffers stay as they are
            extra_tensors, extra_json = {}, {"train_summary": self._summary()}
            if module.stc_head is not None:
                extra_tensors["stc_head"] = head = _strip(state, "stc_head.")
                if isinstance(module.stc_head, TextTagHead):
                    # saved as the cosine head it computes: its rows the trained text tower's tag embeddings
                    tokens = module.stc_head.tokens.to(next(clip.parameters()).device)
                    with torch.no_grad():
                        head["weight"] = encode_text(clip, tokens).float().cpu()
                extra_json["tag_vocab"] = job.tag_vocab
            save_clip(
                clip,
                self.cfg.clip.name,
                job.out_dir / "model",
                extra_tensors=extra_tensors or None,
                extra_json=extra_json,
            )
        dist.barrier()
        return job.out_dir / "model"

    def _summary(self) -> dict:
        p, job = self.plan, self.job
        return {
            "steps": p.total_steps,
            "samples_seen": p.total_steps * p.global_batch,
            "global_batch": p.global_batch,
            "micro_batch": p.micro_batch,
            "world_size": p.world_size,
            "use_annotations": job.use_annotations,
            "hni_weight": job.hni_weight,
            "stc_weight": job.stc_weight,
            "tag_vocab_size": len(job.tag_vocab),
            "stc_head": self.cfg.loss.stc_head if job.stc_weight else None,
            "negatives": job.negative_stats,
            "notes": job.notes,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------- pure parts
def split_micro_batches(inputs: dict[str, Tensor], micro_batch: int) -> list[dict[str, Tensor]]:
    n = next(iter(inputs.values())).shape[0]
    if n % micro_batch:
        raise ValueError(f"a batch of {n} does not split into micro-batches of {micro_batch}")
    return [{k: v[i : i + micro_batch] for k, v in inputs.items()} for i in range(0, n, micro_batch)]


def forward_backward(
    model: Callable[..., dict],
    loss_fn: Callable[..., dict],
    micro_batches: list[dict],
    backward: Callable[[Tensor], object],
) -> dict[str, Tensor]:
    """Forward and backward of one batch given as micro-batches; returns the loss terms (detached).

    A contrastive loss needs every sample of the batch as a negative, so micro-batches cannot simply add
    up their own losses. open_clip's `accum_freq` method: a no-grad forward of every micro-batch caches
    its features; then each micro-batch is recomputed with gradient and the loss taken over the whole
    batch (its fresh features in place, the cached ones elsewhere); its backward adds exactly that
    micro-batch's share of the full-batch gradient, and the sum over micro-batches is the full-batch one.

    `model(**micro_batch)` returns the `ClipWithTagHead` outputs; `loss_fn(**outputs, **loss_inputs)` the
    term dict; `backward(total)` is `loss.backward` or a DeepSpeed engine's `backward`.
    """
    if len(micro_batches) == 1:
        mb = micro_batches[0]
        losses = loss_fn(**model(**mb), **{k: mb[k] for k in LOSS_INPUT_KEYS if k in mb})
        backward(sum(losses.values()))
        return {k: v.detach() for k, v in losses.items()}

    with torch.no_grad():
        cached = [model(**mb) for mb in micro_batches]
    keys = [k for k in FEATURE_KEYS if k in cached[0]]
    cached = [{k: out[k] for k in keys} for out in cached]
    loss_inputs = {k: torch.cat([mb[k] for mb in micro_batches]) for k in LOSS_INPUT_KEYS if k in micro_batches[0]}
    for j, mb in enumerate(micro_batches):
        fresh = model(**mb)
        features = {
            k: torch.cat([c[k] for c in cached[:j]] + [fresh[k]] + [c[k] for c in cached[j + 1 :]]) for k in keys
        }
        # The logit scale multiplies every logit, cached ones included: each pass would add the whole
        # batch's d(loss)/d(scale), so only the first pass lets it through (open_clip's accum_freq counts
        # it accum_freq times).
        scale = fresh["logit_scale"] if j == 0 else fresh["logit_scale"].detach()
        losses = loss_fn(**features, logit_scale=scale, **loss_inputs)
        backward(sum(losses.values()))
    return {k: v.detach() for k, v in losses.items()}


def text_counts(stats: Counter, world_size: int, device: torch.device) -> dict:
    """Shares of the window's text draws over all ranks. `device` is the engine's: NCCL reduces GPU tensors only."""
    values = torch.tensor([float(stats.get(k, 0)) for k in TEXT_COUNT_KEYS], dtype=torch.float64, device=device)
    if world_size > 1:
        import torch.distributed as tdist

        tdist.all_reduce(values)
    counts = dict(zip(TEXT_COUNT_KEYS, values.tolist()))
    n = max(counts["samples"], 1.0)
    drawn = counts["neg_desc"] + counts["neg_tags"]
    return {
        "long_text_share": counts["long_text"] / n,
        "short_text_share": counts["short_text"] / n,
        "neg_share": (drawn - counts["neg_same_as_pos"] - counts["neg_too_far"]) / n,
        # of the negatives drawn: read like their positive / dropped as no minimal edit of it
        "neg_identical_share": counts["neg_same_as_pos"] / max(drawn, 1.0),
        "neg_dropped_share": counts["neg_too_far"] / max(drawn, 1.0),
        "truncated_texts": int(counts["truncated"]),
        # given a rule edit instead (loss.neg_repair: swap); only where it acted, so other logs keep their fields
        **({"neg_repaired_share": counts["neg_repaired"] / max(drawn, 1.0)} if counts["neg_repaired"] else {}),
    }


class JsonlLog:
    """`log.jsonl`, one line per logged step. A resumed run first drops the lines past its checkpoint."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill: everything after it is gone too
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
