"""The stages of a generation, as the controller sees them: what each reads (for its fingerprint) and
which plain stage function it calls. No sequencing here and no state: that is the controller's job.

    gen 0:   data -> train -> eval                     (CLIP_0 on raw alt-text: the baseline)
    gen g:   lvlm -> align -> sft -> annotate -> train -> eval
             LLaVA on CLIP_{g-1}; its annotations of every training image train CLIP_g.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .config import RunConfig, to_dict
from .state import flat_numbers
from .store import Store, gen_tag

log = logging.getLogger(__name__)

GEN0_STAGES = ["data", "train", "eval"]
GEN_STAGES = ["lvlm", "align", "sft", "annotate", "train", "eval"]
ALL_STAGES = ["data", "lvlm", "align", "sft", "annotate", "train", "eval"]


def stages_of(gen: int) -> list[str]:
    return GEN0_STAGES if gen == 0 else GEN_STAGES


@dataclass
class Context:
    """What every stage may read: the config, the run directory, the store, earlier stages' outputs."""

    cfg: RunConfig
    run_dir: Path
    store: Store
    outputs: Callable[[int, str], dict]  # (gen, stage) -> recorded outputs of a finished stage
    progress: bool = True

    def gen_dir(self, gen: int) -> Path:
        return self.run_dir / gen_tag(gen)

    def data(self) -> dict:
        return self.outputs(0, "data")

    def clip_of(self, gen: int) -> str:
        return self.outputs(gen, "train")["clip"]


# Each stage: inputs(ctx, gen) -> JSON-able dict that fingerprints it; run(ctx, gen) -> (outputs, metrics).
# Inputs name config sections by their dotted key so a refused resume can say which key changed.

def data_inputs(ctx: Context, gen: int) -> dict:
    return {"data": to_dict(ctx.cfg.data), "seed": ctx.cfg.seed}


def data_run(ctx: Context, gen: int):
    cfg = ctx.cfg
    counts: dict = {}
    if cfg.data.source == "emoji-scenes":
        from .data.emoji import build_emoji_scenes

        counts = build_emoji_scenes(cfg.data.emoji, ctx.store, progress=ctx.progress)
    elif ctx.store.count("samples") == 0:
        raise RuntimeError(f"data.source=store but the run's samples table is empty: ingest first "
                           f"(hqclip data ingest SOURCE --run {ctx.run_dir})")
    samples = ctx.store.tag("samples", gen_tag(0))
    seed = ctx.store.tag("seed", gen_tag(0))
    n_train = ctx.store.count("samples", "split = 'train'", version=samples)
    return ({"samples_version": samples, "seed_version": seed},
            {"rows": ctx.store.count("samples", version=samples), "train_rows": n_train,
             "seed_rows": ctx.store.count("seed", version=seed), **{f"split/{k}": v for k, v in counts.items()
                                                                   if isinstance(v, int)}})


def lvlm_inputs(ctx: Context, gen: int) -> dict:
    return {"lvlm.lm": to_dict(ctx.cfg.lvlm.lm), "lvlm.vision_feature_layer": ctx.cfg.lvlm.vision_feature_layer,
            "lvlm.keep_cls_token": ctx.cfg.lvlm.keep_cls_token, "clip": ctx.clip_of(gen - 1),
            "data": ctx.data(), "seed": ctx.cfg.seed}


def lvlm_run(ctx: Context, gen: int):
    from .lvlm import build_lvlm, prepare_lm, run_texts

    d = ctx.data()
    texts = run_texts(ctx.store, d["samples_version"], d["seed_version"], ctx.cfg)
    lm_dir = prepare_lm(ctx.cfg.lvlm.lm, texts, ctx.run_dir / "lm", seed=ctx.cfg.seed, progress=ctx.progress,
                        device=_device(ctx.cfg))
    out = build_lvlm(ctx.clip_of(gen - 1), lm_dir, ctx.cfg.lvlm, ctx.gen_dir(gen) / "lvlm" / "base")
    return {"lm": str(lm_dir), "lvlm": str(out)}, {}


def previous_annotate(ctx: Context, gen: int, share: float) -> Optional[dict]:
    """The previous generation's annotate outputs when `share` of its best annotations is asked for (gen >= 2)."""
    return ctx.outputs(gen - 1, "annotate") if gen >= 2 and share > 0 else None


def previous_best(ctx: Context, gen: int, share: float) -> Optional[list[dict]]:
    """Our step beyond the paper: the best-scored `share` of the previous generation's annotations."""
    from .lvlm import best_previous_annotations

    prev = previous_annotate(ctx, gen, share)
    return best_previous_annotations(ctx.store, prev["annotations_version"], gen - 1, share) if prev else None


def align_inputs(ctx: Context, gen: int) -> dict:
    return {"lvlm.align": to_dict(ctx.cfg.lvlm.align), "lvlm.align_alt_text_share": ctx.cfg.lvlm.align_alt_text_share,
            "lvlm.align_add_best": ctx.cfg.lvlm.align_add_best, "base": ctx.outputs(gen, "lvlm"),
            "previous": previous_annotate(ctx, gen, ctx.cfg.lvlm.align_add_best),
            "data": ctx.data(), "seed": ctx.cfg.seed}


def align_run(ctx: Context, gen: int):
    from .lvlm import align_projector
    from .lvlm.data import alt_text_caption_ids

    d = ctx.data()
    extra = alt_text_caption_ids(ctx.store, d["samples_version"], d["seed_version"],
                                 ctx.cfg.lvlm.align_alt_text_share, ctx.cfg.seed)
    best = previous_best(ctx, gen, ctx.cfg.lvlm.align_add_best)
    out, metrics = align_projector(ctx.outputs(gen, "lvlm")["lvlm"], ctx.store, d["samples_version"],
                                   d["seed_version"], ctx.cfg, ctx.gen_dir(gen) / "lvlm" / "aligned",
                                   extra_ids=extra, extra_records=best, progress=ctx.progress)
    return {"lvlm": str(out)}, metrics


def sft_inputs(ctx: Context, gen: int) -> dict:
    return {"lvlm.sft": to_dict(ctx.cfg.lvlm.sft), "lvlm.lora": to_dict(ctx.cfg.lvlm.lora),
            "lvlm.sft_add_best": ctx.cfg.lvlm.sft_add_best, "lvlm.sft_fresh_alt_text": ctx.cfg.lvlm.sft_fresh_alt_text,
            "lvlm.lm.max_length": ctx.cfg.lvlm.lm.max_length, "aligned": ctx.outputs(gen, "align"),
            "previous": previous_annotate(ctx, gen, ctx.cfg.lvlm.sft_add_best),
            "data": ctx.data(), "seed": ctx.cfg.seed}


def sft_run(ctx: Context, gen: int):
    from .lvlm import sft

    d = ctx.data()
    extra = previous_best(ctx, gen, ctx.cfg.lvlm.sft_add_best)
    adapter, merged, metrics = sft(ctx.outputs(gen, "align")["lvlm"], ctx.store, d["samples_version"],
                                   d["seed_version"], ctx.cfg, ctx.gen_dir(gen) / "lvlm" / "sft",
                                   extra_records=extra, progress=ctx.progress)
    return {"adapter": str(adapter) if adapter else None, "merged": str(merged)}, metrics


def annotate_inputs(ctx: Context, gen: int) -> dict:
    a = to_dict(ctx.cfg.annotate)
    a.pop("openai", None), a.pop("vllm", None)  # where it runs does not change what it writes
    return {"annotate": a, "model": ctx.outputs(gen, "sft"), "clip": ctx.clip_of(gen - 1), "data": ctx.data()}


def annotate_run(ctx: Context, gen: int):
    from .annotate.run import annotate_generation

    d = ctx.data()
    stats = annotate_generation(ctx.cfg.annotate, ctx.outputs(gen, "sft")["merged"], ctx.store,
                                d["samples_version"], gen, ctx.gen_dir(gen) / "annotate",
                                score_clip=ctx.clip_of(gen - 1), progress=ctx.progress)
    version = ctx.store.tag("annotations", gen_tag(gen))
    metrics = flat_numbers(stats)
    return {"annotations_version": version, "stats": str(ctx.gen_dir(gen) / "annotate" / "stats.json")}, metrics


def train_inputs(ctx: Context, gen: int) -> dict:
    inputs = {"clip": to_dict(ctx.cfg.clip), "train": to_dict(ctx.cfg.train), "data": ctx.data(),
              "seed": ctx.cfg.seed}
    if gen > 0:
        inputs.update(loss=to_dict(ctx.cfg.loss), annotations=ctx.outputs(gen, "annotate")["annotations_version"])
        if ctx.cfg.clip.init == "previous":
            inputs["init"] = ctx.clip_of(gen - 1)
    return inputs


def train_run(ctx: Context, gen: int):
    from .clip.train import train_clip

    d = ctx.data()
    ann = ctx.outputs(gen, "annotate")["annotations_version"] if gen > 0 else None
    init = ctx.clip_of(gen - 1) if gen > 0 and ctx.cfg.clip.init == "previous" else None
    usable = 0
    if gen > 0:
        usable = ctx.store.count("annotations", f"generation = {gen} AND status != 'failed'", version=ann)
        if usable == 0:  # the annotator wrote nothing usable: CLIP_g sees raw alt-text only, like gen 0
            log.warning("generation %d has no usable annotation: CLIP_%d trains on raw alt-text only", gen, gen)
    clip_dir = train_clip(ctx.cfg, ctx.store.uri, ctx.gen_dir(gen) / "clip", d["samples_version"],
                          annotations_version=ann if usable else None, generation=gen if usable else None,
                          init_clip=init, progress=ctx.progress)
    return ({"clip": str(clip_dir), "log": str(ctx.gen_dir(gen) / "clip" / "log.jsonl")},
            {"usable_annotations": usable} if gen > 0 else {})


def eval_inputs(ctx: Context, gen: int) -> dict:
    return {"eval": to_dict(ctx.cfg.eval), "clip": ctx.clip_of(gen), "data": ctx.data()}


def eval_run(ctx: Context, gen: int):
    from .evaluate import evaluate_clip

    out = ctx.gen_dir(gen) / "metrics.json"
    # splits=None: eval.select_split + eval.splits, skipping those the data has not got (ingested data)
    metrics = evaluate_clip(ctx.clip_of(gen), ctx.store, None, ctx.cfg.eval,
                            samples_version=ctx.data()["samples_version"], out_json=out, progress=ctx.progress)
    return {"metrics": str(out)}, metrics


STAGES: dict[str, tuple[Callable, Callable]] = {
    "data": (data_inputs, data_run),
    "lvlm": (lvlm_inputs, lvlm_run),
    "align": (align_inputs, align_run),
    "sft": (sft_inputs, sft_run),
    "annotate": (annotate_inputs, annotate_run),
    "train": (train_inputs, train_run),
    "eval": (eval_inputs, eval_run),
}


def _device(cfg: RunConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
