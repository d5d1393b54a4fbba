"""`train_clip`: one generation's CLIP, trained with the HQ-CLIP loss under DeepSpeed.

Stage function: (config, store + pinned versions, optional initial CLIP) -> `<out_dir>/model` (a
`save_clip` directory with the STC head and `tag_vocab.json` when STC was on), plus `<out_dir>/log.jsonl`
(step, epoch, lr, each loss term, logit scale, samples/s, text-draw counts) and resumable checkpoints in
`<out_dir>/checkpoints/`. A killed run called again with the same inputs resumes at its last checkpoint,
mid-epoch, and ends with the weights an uninterrupted run ends with.

The pieces: `prepare` (everything checkable before any process starts: sizes, data, tag vocabulary,
the checkpoint directory's owner) -> `dist.launch` (one rank in this process, or spawned ranks) ->
`worker` (DeepSpeed engine, loop, checkpoints, final save).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import RunConfig, fingerprint, to_dict

log = logging.getLogger(__name__)


@dataclass
class TrainPlan:
    """Sizes of the run, derived and checked once."""

    num_samples: int
    world_size: int
    global_batch: int
    local_batch: int
    micro_batch: int
    accum_steps: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, cfg: RunConfig, num_samples: int) -> "TrainPlan":
        t = cfg.train
        world = t.world_size
        if world < 1:
            raise ValueError(f"config key 'train.world_size': got {world}, expected >= 1")
        if t.batch_size % world:
            raise ValueError(f"config key 'train.batch_size': {t.batch_size} does not divide by train.world_size={world}")
        if t.zero_stage not in (1, 2):
            raise ValueError(f"config key 'train.zero_stage': got {t.zero_stage}, expected 1 or 2")
        local = t.batch_size // world
        micro = t.micro_batch_size or local
        if micro < 1 or local % micro:
            raise ValueError(f"config key 'train.micro_batch_size': {t.micro_batch_size} does not divide the per-rank "
                             f"batch {local} (train.batch_size / train.world_size)")
        if num_samples < t.batch_size:
            raise ValueError(f"the train split has {num_samples} samples, fewer than one batch "
                             f"(train.batch_size={t.batch_size})")
        spe = num_samples // t.batch_size
        return cls(num_samples, world, t.batch_size, local, micro, local // micro, spe, spe * t.epochs)


@dataclass
class TrainJob:
    """Everything a rank needs; picklable, so spawned ranks receive it whole."""

    cfg: RunConfig
    out_dir: Path
    dataset: object  # PairDataset (its Lance handles are reopened in each process)
    plan: TrainPlan
    use_annotations: bool
    hni_weight: float
    stc_weight: float
    tag_vocab: list[str] = field(default_factory=list)
    tag_positive_rate: float = 0.0
    init_clip: Optional[str] = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def train_clip(cfg: RunConfig, store_uri, out_dir, samples_version, annotations_version=None,
               generation: Optional[int] = None, init_clip=None, progress: bool = True,
               seed_version=None) -> Path:
    """Train a CLIP on the train split of `store_uri` at the pinned versions; returns `<out_dir>/model`.

    `generation` None or 0: raw alt-text only, HNI and STC off (the baseline). `generation` g >= 1 joins
    that generation's annotations (`annotations_version` pins them), and the teacher seeds as a fallback
    when `seed_version` is given. `init_clip` starts from a checkpoint directory instead of
    `cfg.clip.pretrained` / scratch. `cfg.train.world_size` > 1 spawns that many ranks on this machine.
    """
    from .dist import launch

    job = prepare(cfg, store_uri, out_dir, samples_version, annotations_version, generation, init_clip,
                  progress, seed_version)
    launch(worker, cfg.train.world_size, job)
    return job.out_dir / "model"


# ----------------------------------------------------------------------------------------------- prepare
def prepare(cfg: RunConfig, store_uri, out_dir, samples_version, annotations_version=None, generation=None,
            init_clip=None, progress=True, seed_version=None) -> TrainJob:
    from ..data.loader import PairDataset
    from . import checkpoint
    from .text import build_tag_vocab, normalise_tag

    out_dir = Path(out_dir)
    use_annotations = bool(generation)
    if init_clip is not None:
        _check_init_clip(init_clip, cfg.clip.name)
    if use_annotations:
        _require_annotations(store_uri, generation, annotations_version)
    # The CLIP's (deterministic) transform is set by each rank once it has built the model.
    dataset = PairDataset(store_uri, "train", samples_version=samples_version,
                          annotations_version=annotations_version if use_annotations else None,
                          generation=generation if use_annotations else None,
                          seed_version=seed_version if use_annotations else None)
    plan = TrainPlan.make(cfg, len(dataset))
    hni = cfg.loss.hni_weight if use_annotations else 0.0
    stc = cfg.loss.stc_weight if use_annotations else 0.0
    job = TrainJob(cfg, out_dir, dataset, plan, use_annotations, hni, stc, init_clip=init_clip and str(init_clip),
                   progress=progress)
    if use_annotations:
        tag_lists = _annotated_tags(store_uri, dataset, generation, seed_version is not None)
        if not tag_lists:
            raise ValueError(f"generation {generation} has no usable annotations for the train split "
                             f"(annotations@{dataset.pins.get('annotations')}); annotate before training")
        if stc:
            job.tag_vocab = build_tag_vocab(tag_lists, cfg.loss.stc_vocab_size, cfg.loss.stc_min_count)
            if not job.tag_vocab:
                job.stc_weight = 0.0
                job.notes.append(f"STC off: no tag reaches loss.stc_min_count={cfg.loss.stc_min_count}")
            else:
                vocab = set(job.tag_vocab)
                hits = sum(len({normalise_tag(t) for t in tags} & vocab) for tags in tag_lists)
                job.tag_positive_rate = hits / (len(tag_lists) * len(job.tag_vocab))
    identity = {
        "clip": to_dict(cfg.clip), "loss": to_dict(cfg.loss) if use_annotations else None,
        "train": {k: v for k, v in to_dict(cfg.train).items() if k not in ("checkpoint_every", "log_every")},
        "data": {"samples": dataset.pins.get("samples"), "annotations": dataset.pins.get("annotations"),
                 "seed": dataset.pins.get("seed"), "generation": generation},
        "init_clip": job.init_clip, "seed": cfg.seed,
    }
    identity["fingerprint"] = fingerprint(identity)
    checkpoint.check_run(out_dir / "checkpoints", identity)
    return job


def _check_init_clip(init_clip, name: str) -> None:
    from .model import CheckpointError, read_checkpoint_config

    if not Path(init_clip).is_dir():
        raise FileNotFoundError(f"init_clip '{init_clip}' is not a CLIP checkpoint directory")
    try:
        arch = read_checkpoint_config(init_clip).get("model_name")
    except CheckpointError as err:
        raise FileNotFoundError(str(err)) from None
    if arch != name:
        raise ValueError(f"init_clip '{init_clip}' is a {arch} but config key 'clip.name' asks for {name}")


def _require_annotations(store_uri, generation: int, annotations_version) -> None:
    from ..store import Store

    if not Path(str(store_uri)).is_dir() and "://" not in str(store_uri):
        raise FileNotFoundError(f"no LanceDB store at '{store_uri}'")
    store = Store(store_uri)
    usable = store.count("annotations", f"generation = {int(generation)} AND (status IS NULL OR status != 'failed')",
                         version=annotations_version) if store.has("annotations") else 0
    if usable == 0:
        raise ValueError(f"generation {generation} has no usable annotations (annotations@{annotations_version}); "
                         f"annotate before training")


def _annotated_tags(store_uri, dataset, generation: int, with_seed: bool) -> list[list[str]]:
    """Positive tag lists of the train rows that have a usable annotation (what STC's vocabulary is built on)."""
    from ..store import Store

    store = Store(store_uri)
    train_ids = store.ids("samples", "split = 'train'", version=dataset.pins["samples"])
    rows = store.read("annotations", ["id", "tags", "status"], where=f"generation = {int(generation)}",
                      version=dataset.pins["annotations"]).to_pylist()
    found = {}
    for r in rows:
        if r["id"] in train_ids and (r["status"] or "ok") != "failed" and r["id"] not in found:
            found[r["id"]] = r["tags"] or []
    if with_seed:
        for r in store.read("seed", ["id", "tags"], version=dataset.pins["seed"]).to_pylist():
            if r["id"] in train_ids and r["id"] not in found:
                found[r["id"]] = r["tags"] or []
    return list(found.values())


# ----------------------------------------------------------------------------------------------- worker
def _device(cfg: RunConfig, local_rank: int):
    import torch

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: gloo, no GPU probing
    return torch.device("cpu")


def worker(job: TrainJob) -> None:
    import torch

    from . import checkpoint, dist
    from .loss import HQClipLoss
    from .model import create_clip
    from .optim import deepspeed_config, make_optimizer
    from .text import TextDrawer
    from .train_loop import run_loop
    from .train_module import ClipWithTagHead

    cfg, plan = job.cfg, job.plan
    info = dist.DistInfo.current()
    device = _device(cfg, info.local_rank)
    created = dist.init_process_group(device)
    try:
        import deepspeed

        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (and rank 0's are broadcast)
        clip, _, preprocess_val, tokenizer = create_clip(cfg.clip.name, pretrained=job.init_clip or cfg.clip.pretrained)
        job.dataset.transform = preprocess_val  # deterministic; the random crops are drawn per sample later
        module = ClipWithTagHead(clip, num_tags=len(job.tag_vocab) if job.stc_weight else 0)
        module.init_tag_prior(job.tag_positive_rate)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=make_optimizer(module, cfg.train),
            config=deepspeed_config(cfg.train, plan.micro_batch, plan.accum_steps, plan.world_size, bf16))
        loss_fn = HQClipLoss(cfg.loss, rank=info.rank, world_size=info.world_size,
                             hni_weight=job.hni_weight, stc_weight=job.stc_weight)
        drawer = TextDrawer(cfg.loss, tokenizer, seed=cfg.train.seed, use_annotations=job.use_annotations,
                            negatives=loss_fn.uses_negatives, tag_vocab=job.tag_vocab if loss_fn.uses_tags else None,
                            context_length=getattr(clip, "context_length", None))
        ckpt_root = job.out_dir / "checkpoints"
        resumed = checkpoint.load(engine, ckpt_root, info)
        run_loop(job, engine, optimizer, loss_fn, drawer, info, ckpt_root, resumed, bf16)
        _save_final(job, engine, info, bf16)
    finally:
        if created:
            dist.shutdown()


def _save_final(job: TrainJob, engine, info, bf16: bool) -> None:
    """Rank 0 writes `<out_dir>/model` from the optimizer's fp32 weights (gathered on every rank)."""
    import copy

    from deepspeed.utils import safe_get_full_fp32_param

    from .dist import barrier
    from .model import save_clip

    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # collective under ZeRO: every rank takes part
        state[name] = (full if full is not None else p.detach()).float().cpu()
    if info.is_main:
        clip = module.clip
        if bf16:
            clip = copy.deepcopy(clip).float().cpu()
        clip_state = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
        clip.load_state_dict(clip_state, strict=False)  # buffers stay as they are
        extra_tensors, extra_json = {}, {"train_summary": _summary(job)}
        if module.stc_head is not None:
            extra_tensors["stc_head"] = {k[len("stc_head."):]: v for k, v in state.items() if k.startswith("stc_head.")}
            extra_json["tag_vocab"] = job.tag_vocab
        save_clip(clip, job.cfg.clip.name, job.out_dir / "model", extra_tensors=extra_tensors or None,
                  extra_json=extra_json)
    barrier()


def _summary(job: TrainJob) -> dict:
    p = job.plan
    return {"steps": p.total_steps, "samples_seen": p.total_steps * p.global_batch, "global_batch": p.global_batch,
            "micro_batch": p.micro_batch, "world_size": p.world_size, "use_annotations": job.use_annotations,
            "hni_weight": job.hni_weight, "stc_weight": job.stc_weight, "tag_vocab_size": len(job.tag_vocab),
            "notes": job.notes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

