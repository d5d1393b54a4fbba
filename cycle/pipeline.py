"""The stages of a generation, as the controller sees them. No sequencing here and no state.

    gen 0:   data -> train -> eval                          (CLIP_0 on raw alt-text: the baseline)
    gen 1:   lm -> lvlm -> align -> sft -> annotate -> train -> eval
    gen g:         lvlm -> align -> sft -> annotate -> train -> eval
             LLaVA on CLIP_{g-1}; its annotations of every training image train CLIP_g.

Every stage has one shape: `run(cfg, pins, out_dir, progress) -> StageResult`. `pins` is everything it reads of
earlier stages (table versions, model folders), gathered by its `pins(record, gen)` from the controller's
record; `out_dir` is its own folder, which the controller clears when the stage is redone. What a stage
depends on is its `keys(gen)` (dotted config keys) plus its pins: the controller fingerprints exactly
that, so a refused resume names the key that changed (`loss.hni_weight: 1.0 -> 0.5`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .config import RunConfig, carried_stage, epochs_of, to_dict, trained_generation
from .errors import HQClipError
from .state import flat_numbers
from .store import USABLE, Store, gen_tag

log = logging.getLogger(__name__)


class Record(Protocol):
    """What a stage may read of the run's record: the outputs of a finished stage."""

    def outputs(self, gen: int, stage: str) -> dict: ...


@dataclass(frozen=True)
class StageResult:
    outputs: dict  # what later stages pin: table versions, folders (paths inside the run)
    metrics: dict = field(default_factory=dict)  # numbers for status, report, early stopping


@dataclass(frozen=True)
class Stage:
    name: str
    keys: Callable[[int], tuple]  # config keys (dotted, or `Inert`) that change what it writes, per generation
    pins: Callable[[Record, int], dict]  # what it reads of earlier stages
    run: Callable[..., StageResult]  # (cfg, pins, out_dir, progress=...) -> StageResult
    folder: str  # its out_dir inside the generation's folder
    # what it left on disk, read back without rerunning it (`hqclip doctor` rebuilding a lost state.json);
    # None where its outputs are not all there
    recover: Callable[[RunConfig, dict, Path], Optional[StageResult]]
    table_rows: Optional[str] = None  # a table whose rows of this generation it writes (dropped on redo)


def store_of(cfg: RunConfig) -> Store:
    """The run's store (`Store.from_config`: store.uri with its storage options, else <run_dir>/lance)."""
    return Store.from_config(cfg)


@dataclass(frozen=True)
class Inert:
    """A config key that does not act at this generation, recorded at `value` whatever the config says: so
    setting it before a later generation leaves the finished ones valid (e.g. `lvlm.sft_add_best`, which
    acts from generation 2, in generation 1's SFT)."""

    key: str
    value: Any


def config_inputs(cfg: RunConfig, keys: tuple) -> dict:
    """{dotted key: plain value} of the config keys a stage depends on; "-a.b" leaves sub-key b out of a;
    an `Inert` key is recorded at its fixed value (inside its section when the section is recorded: the same
    inputs, hence fingerprint, as a run recorded before the key acted anywhere)."""
    out = {}
    for key in keys:
        if isinstance(key, Inert):
            section, _, sub = key.key.rpartition(".")
            if isinstance(out.get(section), dict):
                out[section][sub] = key.value
            else:
                out[key.key] = key.value
            continue
        if key.startswith("-"):
            section, _, sub = key[1:].rpartition(".")
            out[section].pop(sub, None)
            continue
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = to_dict(value)
    return out


# ------------------------------------------------------------------------------------------------ pins
def data_pins(record: Record, gen: int) -> dict:
    """The pinned tables of generation 0's data stage: every later stage reads these versions."""
    return {"data": record.outputs(0, "data")}


def clip_of(record: Record, gen: int) -> str:
    return record.outputs(gen, "train")["clip"]


def carries(cfg: RunConfig, gen: int) -> bool:
    """Whether generation `gen` starts from the previous generation's annotator (`lvlm.carry`)."""
    return cfg.lvlm.carry.enabled and gen >= 2


def previous_annotate(record: Record, gen: int, share: float) -> Optional[dict]:
    """When `share` of the previous generation's best annotations is asked for (gen >= 2): its annotate
    outputs and the CLIP trained on them, which rates them (`lvlm.data.clip_fit`)."""
    if gen >= 2 and share > 0:
        return {**record.outputs(gen - 1, "annotate"), "clip": clip_of(record, gen - 1)}
    return None


# ------------------------------------------------------------------------------------------------ stages
def data_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    store = store_of(cfg)
    counts: dict = {}
    if cfg.data.source == "emoji-scenes":
        from .data.emoji import build_emoji_scenes

        counts = build_emoji_scenes(cfg.data.emoji, store, progress=progress, write_batch=cfg.store.write_batch)
    elif store.count("samples") == 0:
        raise HQClipError(
            f"data.source=store but the run's samples table is empty: ingest first "
            f"(hqclip data ingest SOURCE --run {cfg.run_dir})"
        )
    samples = store.tag("samples", gen_tag(0))
    seed = store.tag("teacher", gen_tag(0))
    n_train = store.count("samples", "split = 'train'", version=samples)
    return StageResult(
        {"samples_version": samples, "teacher_version": seed},
        {
            "rows": store.count("samples", version=samples),
            "train_rows": n_train,
            "teacher_rows": store.count("teacher", version=seed),
            **{f"split/{k}": v for k, v in counts.items() if isinstance(v, int)},
        },
    )


def lm_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    """The LLaVA's language model, once per run: pretrained here ("tiny") or named (an HF model)."""
    from .lvlm import prepare_lm, run_texts

    if cfg.lvlm.base.strip():  # an existing LLaVA brings its LM: nothing to prepare
        return StageResult({"lm": cfg.lvlm.base})
    d = pins["data"]
    texts = run_texts(store_of(cfg), d["samples_version"], d["teacher_version"], cfg)
    lm_dir = prepare_lm(cfg.lvlm.lm, texts, out_dir, seed=cfg.seed, progress=progress, device=cfg.device)
    return StageResult({"lm": str(lm_dir)})


def run_lvlm_dirs(run_dir: Path) -> list[Path]:
    """The run's finished LLaVA directories (base, aligned, merged of every generation): a new LLaVA's part
    equal to one of theirs is a hard link (the LM is stored once while it does not change)."""
    from .lvlm.weights import INDEX

    return sorted(p.parent for p in Path(run_dir).glob(f"gen-*/lvlm/**/{INDEX}") if ".partial" not in str(p))


def lvlm_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .lvlm import build_lvlm

    carried = pins.get("carried")  # the previous annotator: its LM and projector, under the new tower
    base = annotator_of(carried)[0] if carried else None
    out = build_lvlm(
        pins["clip"],
        pins["lm"],
        cfg.lvlm,
        out_dir,
        seed=cfg.seed,
        device=cfg.device,
        base=base,
        link_from=run_lvlm_dirs(cfg.run_dir),
    )
    return StageResult({"lvlm": str(out)})


# Alignment and SFT of a generation rate the same annotations with the same CLIP: the one rating pass is kept
# for the next call in this process (one entry; a resumed SFT in a new process rates them again).
_LAST_BEST: dict[tuple, list[dict]] = {}


def previous_best(cfg: RunConfig, pins: dict, share: float) -> Optional[list[dict]]:
    """Our step beyond the paper: the `share` of the previous generation's annotations that the CLIP trained
    on them rates best (not the model that wrote them)."""
    from .lvlm.data import best_previous_annotations, clip_fit

    prev, d = pins.get("previous"), pins["data"]
    if not prev:
        return None
    gen = pins["generation"] - 1
    key = (str(cfg.run_dir), cfg.store.uri, prev["clip"], prev["annotations_version"], gen, share, *d.values())
    if key not in _LAST_BEST:
        store = store_of(cfg)
        fit = clip_fit(prev["clip"], store, d["samples_version"], d["teacher_version"], cfg.device)
        _LAST_BEST.clear()
        _LAST_BEST[key] = best_previous_annotations(store, prev["annotations_version"], gen, share, fit)
    return list(_LAST_BEST[key])


def align_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .lvlm.data import alt_text_caption_ids
    from .lvlm.ray_stage import run_lvlm_stage

    d, store = pins["data"], store_of(cfg)
    extra = alt_text_caption_ids(
        store, d["samples_version"], d["teacher_version"], cfg.lvlm.align_alt_text_share, cfg.seed
    )
    out, metrics = run_lvlm_stage(
        "align",
        carried_stage(cfg, "align") if pins.get("carried") else cfg,
        store,
        lvlm_dir=pins["base"]["lvlm"],
        samples_version=d["samples_version"],
        teacher_version=d["teacher_version"],
        out_dir=out_dir,
        extra_ids=extra,
        extra_records=previous_best(cfg, pins, cfg.lvlm.align_add_best),
        progress=progress,
    )
    return StageResult({"lvlm": str(out)}, metrics)


def sft_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .lvlm.ray_stage import run_lvlm_stage

    d = pins["data"]
    adapter, merged, metrics = run_lvlm_stage(
        "sft",
        carried_stage(cfg, "sft") if pins.get("carried") else cfg,
        store_of(cfg),
        lvlm_dir=pins["aligned"]["lvlm"],
        samples_version=d["samples_version"],
        teacher_version=d["teacher_version"],
        out_dir=out_dir,
        extra_records=previous_best(cfg, pins, cfg.lvlm.sft_add_best),
        progress=progress,
    )
    # adapter-only (a real LM with LoRA): annotation serves the aligned LLaVA + adapter, no merged copy
    return StageResult(
        {
            "adapter": str(adapter) if adapter else None,
            "merged": str(merged) if merged else None,
            "base": pins["aligned"]["lvlm"],
        },
        metrics,
    )


def annotator_of(sft_outputs: dict) -> tuple[str, Optional[str]]:
    """(model dir, LoRA adapter dir or None) that annotation loads from the sft stage's outputs."""
    if sft_outputs.get("merged"):
        return sft_outputs["merged"], None
    return sft_outputs["base"], sft_outputs["adapter"]


def annotate_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .annotate.run import annotate_generation

    gen, store = pins["generation"], store_of(cfg)
    model_dir, adapter = annotator_of(pins["model"])
    stats = annotate_generation(
        cfg.annotate,
        model_dir,
        store,
        pins["data"]["samples_version"],
        gen,
        out_dir,
        score_clip=pins["clip"],
        progress=progress,
        device=cfg.device,
        lora_dir=adapter,
        cluster=cfg.cluster,
    )
    version = store.tag("annotations", gen_tag(gen))
    return StageResult({"annotations_version": version, "stats": str(out_dir / "stats.json")}, flat_numbers(stats))


def usable_annotations(store: Store, gen: int, annotations_version) -> int:
    """How many of generation `gen`'s annotations CLIP_g can train on (0 for generation 0)."""
    if gen == 0:
        return 0
    return store.count("annotations", f"generation = {gen} AND {USABLE}", version=annotations_version)


def train_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .clip.train import train_clip

    gen, ann, store = pins["generation"], pins.get("annotations"), store_of(cfg)
    cfg = trained_generation(cfg, gen)
    usable = usable_annotations(store, gen, ann)
    if gen > 0 and usable == 0:  # the annotator wrote nothing usable: CLIP_g sees raw alt-text only, like gen 0
        log.warning("generation %d has no usable annotation: CLIP_%d trains on raw alt-text only", gen, gen)
    clip_dir = train_clip(
        cfg,
        store.uri,
        out_dir,
        pins["data"]["samples_version"],
        annotations_version=ann if usable else None,
        generation=gen if usable else None,
        init_clip=pins.get("init"),
        progress=progress,
        teacher_version=pins["data"]["teacher_version"] if usable and cfg.loss.seed_texts == "teacher" else None,
        storage_options=store.storage_options,
    )
    return StageResult(
        {"clip": str(clip_dir), "log": str(out_dir / "log.jsonl")}, {"usable_annotations": usable} if gen > 0 else {}
    )


def eval_run(cfg: RunConfig, pins: dict, out_dir: Path, progress: bool = True) -> StageResult:
    from .evaluate import evaluate_clip

    out = out_dir / "metrics.json"
    # splits=None: eval.select_split + eval.splits, skipping those the data has not got (ingested data)
    metrics = evaluate_clip(
        pins["clip"],
        store_of(cfg),
        None,
        cfg.eval,
        device=cfg.device,
        samples_version=pins["data"]["samples_version"],
        out_json=out,
        progress=progress,
    )
    return StageResult({"metrics": str(out)}, metrics)


# ------------------------------------------------------------------------- recovery (hqclip doctor)
def _has_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def data_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    store = store_of(cfg)
    tags = {name: store.tags(name).get(gen_tag(0)) if store.has(name) else None for name in ("samples", "teacher")}
    if None in tags.values():
        return None
    return StageResult({"samples_version": tags["samples"], "teacher_version": tags["teacher"]})


def lm_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    if cfg.lvlm.base.strip():
        return StageResult({"lm": cfg.lvlm.base})
    if cfg.lvlm.lm.name != "tiny":
        return StageResult({"lm": cfg.lvlm.lm.name})
    return StageResult({"lm": str(out_dir)}) if _has_model(out_dir) else None


def lvlm_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    return StageResult({"lvlm": str(out_dir)}) if _has_model(out_dir) else None


def sft_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    from .config import sft_adapter_only

    adapter = out_dir / "adapter"
    merged = None if sft_adapter_only(cfg.lvlm) else out_dir / "merged"
    if (merged is not None and not _has_model(merged)) or (merged is None and not adapter.is_dir()):
        return None
    return StageResult(
        {
            "adapter": str(adapter) if adapter.is_dir() else None,
            "merged": str(merged) if merged else None,
            "base": pins["aligned"]["lvlm"],
        }
    )


def annotate_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    from .files import read_json

    store, stats = store_of(cfg), out_dir / "stats.json"
    version = store.tags("annotations").get(gen_tag(pins["generation"])) if store.has("annotations") else None
    if version is None or not stats.is_file():
        return None
    return StageResult({"annotations_version": version, "stats": str(stats)}, flat_numbers(read_json(stats)))


def train_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    if not (out_dir / "model").is_dir():
        return None
    gen, ann = pins["generation"], pins.get("annotations")
    usable = usable_annotations(store_of(cfg), gen, ann)
    return StageResult(
        {"clip": str(out_dir / "model"), "log": str(out_dir / "log.jsonl")},
        {"usable_annotations": usable} if gen > 0 else {},
    )


def eval_recover(cfg: RunConfig, pins: dict, out_dir: Path) -> Optional[StageResult]:
    from .files import read_json

    out = out_dir / "metrics.json"
    return StageResult({"metrics": str(out)}, read_json(out)) if out.is_file() else None


def _train_pins(record: Record, gen: int) -> dict:
    pins = {**data_pins(record, gen), "generation": gen}
    if gen > 0:
        pins["annotations"] = record.outputs(gen, "annotate")["annotations_version"]
    return pins


def _train_init(cfg_init: str) -> Callable[[Record, int], dict]:
    return lambda record, gen: {"init": clip_of(record, gen - 1)} if gen > 0 and cfg_init == "previous" else {}


def make_stages(cfg: RunConfig) -> dict[str, Stage]:
    """The stages of a run. Some pins depend on config values (which previous outputs a stage reads)."""
    lv = cfg.lvlm
    init = _train_init(cfg.clip.init)
    # keys added for real models count only when set away from their defaults, so the runs recorded
    # before them still resume (gradient checkpointing never counts: it changes memory, not results)
    base_key = ("lvlm.base",) if lv.base.strip() else ()
    dtype_key = ("lvlm.dtype",) if lv.dtype != "auto" else ()
    save_key = ("lvlm.sft_save",) if lv.sft_save != "auto" else ()
    late_loss = {"neg_repair": "none", "seed_texts": "annotator"}  # loss keys added after runs were recorded
    late_keys = tuple(f"-loss.{k}" for k, default in late_loss.items() if getattr(cfg.loss, k) == default)

    def carry_key(g: int) -> tuple:  # counts only where it acts, so runs recorded before it still resume
        return ("lvlm.carry",) if carries(cfg, g) else ()

    def carry_pin(g: int) -> dict:
        return {"carried": True} if carries(cfg, g) else {}

    def add_best_key(g: int, key: str):  # acts from generation 2; recorded at 0.0 before (its default)
        return key if g >= 2 else Inert(key, 0.0)

    def train_keys(g: int) -> tuple:  # the epochs this generation trains, never the per-generation list
        return ("clip", "train", "-train.epochs_per_generation", Inert("train.epochs", epochs_of(cfg.train, g)), "seed")

    return {
        s.name: s
        for s in [
            Stage("data", lambda g: ("data", "seed"), lambda r, g: {}, data_run, "data", data_recover),
            Stage("lm", lambda g: ("lvlm.lm", *base_key, "seed"), data_pins, lm_run, "lm", lm_recover),
            Stage(
                "lvlm",
                lambda g: (
                    "lvlm.vision_feature_layer",
                    "lvlm.keep_cls_token",
                    *base_key,
                    *dtype_key,
                    *carry_key(g),
                    "seed",
                ),
                lambda r, g: {
                    "clip": clip_of(r, g - 1),
                    "lm": r.outputs(1, "lm")["lm"],
                    **({"carried": r.outputs(g - 1, "sft")} if carries(cfg, g) else {}),
                },
                lvlm_run,
                "lvlm/base",
                lvlm_recover,
            ),
            Stage(
                "align",
                lambda g: (
                    "lvlm.align",
                    "lvlm.align_alt_text_share",
                    add_best_key(g, "lvlm.align_add_best"),
                    *carry_key(g),
                    "seed",
                ),
                lambda r, g: {
                    **data_pins(r, g),
                    "generation": g,
                    **carry_pin(g),
                    "base": r.outputs(g, "lvlm"),
                    "previous": previous_annotate(r, g, lv.align_add_best),
                },
                align_run,
                "lvlm/aligned",
                lvlm_recover,
            ),
            Stage(
                "sft",
                lambda g: (
                    "lvlm.sft",
                    "lvlm.lora",
                    add_best_key(g, "lvlm.sft_add_best"),
                    "lvlm.sft_fresh_alt_text",
                    "lvlm.lm.max_length",
                    *save_key,
                    *carry_key(g),
                    "seed",
                ),
                lambda r, g: {
                    **data_pins(r, g),
                    "generation": g,
                    **carry_pin(g),
                    "aligned": r.outputs(g, "align"),
                    "previous": previous_annotate(r, g, lv.sft_add_best),
                },
                sft_run,
                "lvlm/sft",
                sft_recover,
            ),
            # where the annotator runs (annotate.openai, annotate.vllm) does not change what it writes
            Stage(
                "annotate",
                lambda g: ("annotate", "-annotate.openai", "-annotate.vllm"),
                lambda r, g: {
                    **data_pins(r, g),
                    "generation": g,
                    "model": r.outputs(g, "sft"),
                    "clip": clip_of(r, g - 1),
                },
                annotate_run,
                "annotate",
                annotate_recover,
                table_rows="annotations",
            ),
            Stage(
                "train",
                # generation 0 has no previous CLIP to start from: clip.init does not act there
                lambda g: train_keys(g) + (("loss", *late_keys) if g > 0 else (Inert("clip.init", "scratch"),)),
                lambda r, g: {**_train_pins(r, g), **init(r, g)},
                train_run,
                "clip",
                train_recover,
            ),
            Stage(
                "eval",
                lambda g: ("eval",),
                lambda r, g: {**data_pins(r, g), "clip": clip_of(r, g)},
                eval_run,
                "eval",
                eval_recover,
            ),
        ]
    }


def stages_of(gen: int) -> list[str]:
    if gen == 0:
        return ["data", "train", "eval"]
    return (["lm"] if gen == 1 else []) + ["lvlm", "align", "sft", "annotate", "train", "eval"]


ALL_STAGES = ["data", "lm", "lvlm", "align", "sft", "annotate", "train", "eval"]
