"""`train_clip`: one generation's CLIP, trained with the HQ-CLIP loss under DeepSpeed.

Stage function: (config, store + pinned versions, optional initial CLIP) -> `<out_dir>/model` (a
`save_clip` directory with the STC head and `tag_vocab.json` when STC was on), plus `<out_dir>/log.jsonl`
(step, epoch, lr, each loss term, logit scale, samples/s, text-draw counts) and resumable checkpoints in
`<out_dir>/checkpoints/`. A killed run called again with the same inputs resumes at its last checkpoint,
mid-epoch, and ends with the weights an uninterrupted run ends with.

The pieces: `prepare` (everything checkable before any process starts that config validation cannot
check: the data, the tag vocabulary, the initial CLIP, the checkpoint directory's owner) -> `dist.launch`
(one rank in this process, or spawned ranks) -> `trainer.train_rank` (the `Trainer`: DeepSpeed engine,
loop, checkpoints, final save).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..config import RunConfig, fingerprint, to_dict
from ..errors import HQClipError

RECORD_CHUNK_ROWS = 4096  # annotation records read (as Python objects) at a time by the controller's pass


# ValueError stays a base: `cycle run` and `cycle train` (cycle/cli.py) catch ValueError for a one-line error.
class TrainInputError(HQClipError, ValueError):
    """The store, its annotations or the initial CLIP cannot train this config; the message says which."""


@dataclass
class TrainPlan:
    """Sizes of the run, derived once (config validation has checked how the batch splits)."""

    num_samples: int
    world_size: int
    shards: int  # contiguous ranges of the train rows, each read by one rank (`ResumableSampler`)
    global_batch: int
    local_batch: int
    micro_batch: int
    accum_steps: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, cfg: RunConfig, num_samples: int) -> "TrainPlan":
        t = cfg.train
        local = t.batch_size // t.world_size
        micro = t.micro_batch_size or local
        if num_samples < t.batch_size:
            raise TrainInputError(
                f"the train split has {num_samples} samples, fewer than one batch (train.batch_size={t.batch_size})"
            )
        spe = num_samples // t.batch_size  # = (num_samples // shards) // (batch_size // shards): same with shards
        return cls(
            num_samples, t.world_size, t.world_size, t.batch_size, local, micro, local // micro, spe, spe * t.epochs
        )


@dataclass
class TrainJob:
    """Everything a rank needs; small and picklable, so spawned ranks and Ray workers receive it whole.

    The data travels as `PairDataset` arguments with every version pinned to an int: each rank indexes
    and reads only its own rows (`ResumableSampler.owned_rows`), never an index of the whole table."""

    cfg: RunConfig
    out_dir: Path
    data: dict  # PairDataset keyword arguments (store_uri, split, pinned versions, generation, storage_options)
    plan: TrainPlan
    use_annotations: bool
    hni_weight: float
    stc_weight: float
    tag_vocab: list[str] = field(default_factory=list)
    tag_positive_rate: float = 0.0
    tag_prior: list[float] = field(default_factory=list)  # per vocabulary tag: its share of annotated samples
    init_clip: Optional[str] = None
    # the previous head to carry over: {"from": dir, "tag_vocab": [...], "state": {name: tensor}}
    stc_head_init: Optional[dict] = None
    negative_stats: dict = field(default_factory=dict)  # `text.negative_part_stats` of the annotations
    # `negatives.neighbour_index` of the training descriptions (`loss.hni_negatives: mined`), else empty
    neighbours: dict = field(default_factory=dict)
    progress: bool = True
    notes: list[str] = field(default_factory=list)


def train_clip(
    cfg: RunConfig,
    store_uri,
    out_dir,
    samples_version,
    annotations_version=None,
    generation: Optional[int] = None,
    init_clip=None,
    progress: bool = True,
    teacher_version=None,
    stc_head_from=None,
    storage_options=None,
) -> Path:
    """Train a CLIP on the train split of `store_uri` at the pinned versions; returns `<out_dir>/model`.

    `generation` None or 0: raw alt-text only, HNI and STC off (the baseline). `generation` g >= 1 joins
    that generation's annotations (`annotations_version` pins them), and the teacher seeds as a fallback
    when `teacher_version` is given (with `loss.seed_texts: teacher`, the seeds first and the annotations
    as the fallback). `init_clip` starts from a checkpoint directory instead of
    `cfg.clip.pretrained` / scratch. `cfg.train.world_size` > 1 spawns that many ranks on this machine, or,
    with `cluster.executor: ray`, runs that many Ray Train workers (`ray_train`); under a launcher
    (torchrun, srun) this process is one rank and joins the others.
    `storage_options` reach an object store URI (`Store.storage_options`); the ranks get them with the dataset.

    STC head carry-over: `stc_head_from` is a CLIP checkpoint directory with `stc_head` + `tag_vocab`
    (the previous generation's); the new head's rows of the tags in both vocabularies start from it.
    Default: `init_clip` (with `clip.init=previous` the head comes with the CLIP it was trained on). A
    head's rows are directions in its own CLIP's embedding space: with a CLIP from scratch they carry
    the tag priors (biases) and the scale, not the directions, so the pipeline need not pass it then.
    """
    from ..device import resolve_device
    from .dist import launch
    from .trainer import train_rank

    device_type = resolve_device(cfg.device).type  # no GPU for device=cuda: refused before anything starts
    job = prepare(
        cfg,
        store_uri,
        out_dir,
        samples_version,
        annotations_version,
        generation,
        init_clip,
        progress,
        teacher_version,
        storage_options=storage_options,
        stc_head_from=stc_head_from,
    )
    if cfg.cluster.executor == "ray":
        from .ray_train import train_with_ray

        train_with_ray(job, cfg.cluster, device_type)
    else:
        launch(train_rank, cfg.train.world_size, job, accelerator=device_type)
        _give_back_heap()
    return job.out_dir / "model"


def _give_back_heap() -> None:
    """One rank trains in this process: collect what it left and hand freed heap pages back to the system
    (glibc's `malloc_trim`), so the next stage's peak does not sit on top of them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# ----------------------------------------------------------------------------------------------- prepare
def prepare(
    cfg: RunConfig,
    store_uri,
    out_dir,
    samples_version,
    annotations_version=None,
    generation=None,
    init_clip=None,
    progress=True,
    teacher_version=None,
    stc_head_from=None,
    storage_options=None,
) -> TrainJob:
    from ..data.loader import pinned_version, split_size
    from ..store import Store, is_local
    from . import checkpoint
    from .negatives import negative_part_stats, neighbour_index
    from .text import normalise_tag, rank_tags

    out_dir = Path(out_dir)
    use_annotations = bool(generation)
    if is_local(store_uri) and not Path(str(store_uri)).is_dir():
        raise TrainInputError(f"no LanceDB store at '{store_uri}'")
    if init_clip is not None:
        _check_init_clip(init_clip, cfg.clip.name)
    store = Store(store_uri, storage_options) if use_annotations else None
    if use_annotations:
        _require_annotations(store, generation, annotations_version)
    # Only the versions are pinned here (and the train rows counted): each rank indexes its own rows.
    num_samples, samples_pin = split_size(store_uri, "train", samples_version, storage_options)
    pins = {"samples": samples_pin}
    if use_annotations:
        pins["annotations"] = pinned_version(store_uri, "annotations", annotations_version, storage_options)
        if teacher_version is not None:
            pins["teacher"] = pinned_version(store_uri, "teacher", teacher_version, storage_options)
    data = dict(
        store_uri=str(store_uri),
        split="train",
        samples_version=pins["samples"],
        annotations_version=pins.get("annotations"),
        generation=generation if use_annotations else None,
        teacher_version=pins.get("teacher"),
        prefer="teacher" if "teacher" in pins and cfg.loss.seed_texts == "teacher" else "annotations",
        storage_options=storage_options,
    )
    plan = TrainPlan.make(cfg, num_samples)
    hni = cfg.loss.hni_weight if use_annotations else 0.0
    stc = cfg.loss.stc_weight if use_annotations else 0.0
    job = TrainJob(
        cfg,
        out_dir,
        data,
        plan,
        use_annotations,
        hni,
        stc,
        init_clip=init_clip and str(init_clip),
        progress=progress,
    )
    if use_annotations:
        # One streamed pass over the annotated train rows: negative shares, and tag counts (once per sample).
        tag_counts: Counter = Counter()
        annotated = 0
        mined = hni and cfg.loss.hni_negatives == "mined"
        sentences: set = set()

        def counted(records):
            nonlocal annotated
            for rec in records:
                annotated += 1
                tag_counts.update({t for t in (normalise_tag(x) for x in rec["tags"]) if t})
                if mined:
                    sentences.update(rec["desc"])
                yield rec

        records = counted(_annotated_records(data, pins, generation))
        job.negative_stats = negative_part_stats(records, cfg.loss.neg_max_edit_words)
        if not annotated:
            raise TrainInputError(
                f"generation {generation} has no usable annotations for the train split "
                f"(annotations@{pins.get('annotations')}); annotate before training"
            )
        if mined:
            try:
                job.neighbours = neighbour_index(sorted(sentences))
            except ValueError as e:
                raise TrainInputError(f"loss.hni_negatives=mined: {e}") from None
            have = f"{len(job.neighbours)} of {len(sentences)} training sentences"
            job.notes.append(f"mined negatives: {have} have a one-word neighbour")
        if stc:
            job.tag_vocab = rank_tags(tag_counts, cfg.loss.stc_vocab_size, cfg.loss.stc_min_count)
            if not job.tag_vocab:
                job.stc_weight = 0.0
                job.notes.append(f"STC off: no tag reaches loss.stc_min_count={cfg.loss.stc_min_count}")
            else:
                job.tag_prior = [tag_counts[t] / annotated for t in job.tag_vocab]
                job.tag_positive_rate = sum(tag_counts[t] for t in job.tag_vocab) / (annotated * len(job.tag_vocab))
                job.stc_head_init = _previous_head(stc_head_from or init_clip, explicit=stc_head_from is not None)
                if job.stc_head_init is not None:
                    shared = len(set(job.stc_head_init["tag_vocab"]) & set(job.tag_vocab))
                    job.notes.append(
                        f"STC head: {shared} of {len(job.tag_vocab)} tags start from {job.stc_head_init['from']}'s head"
                    )
    identity = {
        "clip": to_dict(cfg.clip),
        "loss": to_dict(cfg.loss) if use_annotations else None,
        "train": {
            k: v
            for k, v in to_dict(cfg.train).items()
            if k not in ("checkpoint_every", "log_every", "epochs_per_generation")  # the pipeline resolves the last
        },
        "data": {
            "samples": pins.get("samples"),
            "annotations": pins.get("annotations"),
            "teacher": pins.get("teacher"),
            "generation": generation,
        },
        "init_clip": job.init_clip,
        "stc_head_from": job.stc_head_init and job.stc_head_init["from"],
        "seed": cfg.seed,
    }
    identity["fingerprint"] = fingerprint(identity)
    checkpoint.check_run(out_dir / "checkpoints", identity)
    return job


def _check_init_clip(init_clip, name: str) -> None:
    from .model import CheckpointError, read_checkpoint_config

    if not Path(init_clip).is_dir():
        raise TrainInputError(f"init_clip '{init_clip}' is not a CLIP checkpoint directory")
    try:
        arch = read_checkpoint_config(init_clip).get("model_name")
    except CheckpointError as err:
        raise TrainInputError(f"init_clip: {err}") from None
    if arch != name:
        raise TrainInputError(f"init_clip '{init_clip}' is a {arch} but config key 'clip.name' asks for {name}")


def _require_annotations(store, generation: int, annotations_version) -> None:
    from ..store import USABLE

    usable = (
        store.count("annotations", f"generation = {int(generation)} AND {USABLE}", version=annotations_version)
        if store.has("annotations")
        else 0
    )
    if usable == 0:
        raise TrainInputError(
            f"generation {generation} has no usable annotations (annotations@{annotations_version}); "
            f"annotate before training"
        )


def _previous_head(path, explicit: bool) -> Optional[dict]:
    """The `stc_head` tensors and `tag_vocab` of a CLIP checkpoint directory, or None when it has none
    (an explicitly given directory must exist)."""
    import json

    from safetensors.torch import load_file

    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        if explicit:
            raise TrainInputError(f"stc_head_from '{path}' is not a CLIP checkpoint directory")
        return None
    head, vocab = path / "stc_head.safetensors", path / "tag_vocab.json"
    if not (head.is_file() and vocab.is_file()):
        return None
    try:
        return {"from": str(path), "tag_vocab": list(json.loads(vocab.read_text())), "state": load_file(head)}
    except Exception as err:  # safetensors' own error type, JSON, OS: all one message
        raise TrainInputError(f"STC head of '{path}' is unreadable: {err}") from None


def _annotated_records(data: dict, pins: dict, generation: int) -> Iterator[dict]:
    """The four formulas of each train row as training reads them (`PairDataset`'s `prefer`): its first usable
    annotation of `generation`, else, when a teacher table is pinned, its teacher row, or the other way round
    with `prefer="teacher"`; streamed in chunks, never the whole table."""
    import lance
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..data.loader import first_positions, open_pinned_dataset, split_positions
    from ..store import USABLE_STATUSES

    def usable(chunk) -> pa.ChunkedArray:
        statuses = pa.array(USABLE_STATUSES, pa.string())
        return pc.and_(pc.equal(chunk.column("generation"), generation), pc.is_in(chunk.column("status"), statuses))

    def opened(name: str) -> lance.LanceDataset:
        return open_pinned_dataset(data["store_uri"], name, pins[name], data["storage_options"])

    _, ids = split_positions(opened("samples"), "train", None)
    found = [(opened("annotations"), first_positions(opened("annotations"), ids, ["generation", "status"], usable))]
    if "teacher" in pins:
        found.append((opened("teacher"), first_positions(opened("teacher"), ids, [], None)))
        if data.get("prefer") == "teacher":
            found.reverse()
        found[1] = (found[1][0], np.where(found[0][1] < 0, found[1][1], -1))  # the second only where the first has none
    formulas = ["desc", "neg_desc", "tags", "neg_tags"]
    for ds, positions in found:
        positions = np.sort(positions[positions >= 0])
        for begin in range(0, len(positions), RECORD_CHUNK_ROWS):
            for r in ds.take(positions[begin : begin + RECORD_CHUNK_ROWS].tolist(), columns=formulas).to_pylist():
                yield {k: r[k] or [] for k in formulas}
