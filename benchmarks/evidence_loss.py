"""Evidence for the HQ-CLIP loss (issue 3): which terms help a CLIP trained on good annotations?

    python benchmarks/evidence_loss.py [--config configs/emoji.yaml] [--seeds 0,1,2] [--variants a,b,c,d,e]
                                       [--work generations/evidence-loss] [--runs runs] [--threads 1]
                                       [--out benchmarks/results/evidence_loss.md] [key=value ...]

The figures in benchmarks/results/evidence_loss.md: `--threads 1 train.epochs=10` (about 40 min here).

Five CLIPs per seed, all on the same emoji-scenes build (`data.emoji.seed_share=1.0`, so every training
scene has a teacher annotation written by the scene-graph teacher, the perfect annotator of this data):

    (a) alt-text only              `train_clip(generation=None)`: the corrupted alt-text, L_clip
    (b) teacher, L_clip            generation 1 = the teacher records; HNI and STC weights 0
    (c) teacher, L_clip + HNI      STC weight 0
    (d) teacher, L_clip + STC      HNI weight 0
    (e) teacher, all three terms

In (b)-(e) the positive text is drawn per sample between alt-text and description (`loss.long_text_prob`),
as in the paper. The teacher records enter through the real path: copied from `seed` into `annotations`
as generation 1 (status "ok", annotator "teacher:scene-graph", the schema's prompt hash), tagged
`gen-001`, read pinned by the trainer. A seed sets `seed` and `train.seed` (weights, batch order, text
draws, crops); the dataset is one build. Each run is evaluated on `val` and the held-out splits.

Every run writes `<work>/<runs>/<variant>-s<seed>/result.json` last; a rerun skips finished runs (and a killed
training resumes from its checkpoint), and refuses results made with another config: a probe with other
settings over the same data build takes its own `--runs` folder. Prints the markdown table and writes it
to `--out`. Tune on `val` only, never on the test splits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the report helper beside this file

from evidence_loss_report import (  # noqa: E402,F401  (re-exported: the script's core is importable from here)
    COMPARISONS,
    METRICS,
    VARIANT_BY_KEY,
    VARIANTS,
    Variant,
    markdown_report,
    mean_std,
    paired_differences,
    summarise,
)

from cycle.config import RunConfig, fingerprint, load_config, to_dict  # noqa: E402

TEACHER = "teacher:scene-graph"
GENERATION = 1


# ----------------------------------------------------------------------------------------------- config
def base_config(config_path: str | Path, overrides: Sequence[str] = (), threads: int = 0) -> RunConfig:
    """The shared config: the file + overrides, every training scene seeded, checked for the ablation."""
    cfg = load_config(config_path, [*overrides, "data.emoji.seed_share=1.0"])
    if threads:
        cfg = replace(cfg, cpu_threads=threads)
    if cfg.data.source != "emoji-scenes":
        raise ValueError(
            f"config key 'data.source': got {cfg.data.source!r}; the ablation needs the built-in "
            "emoji-scenes data (its scene-graph teacher annotates every training scene)"
        )
    for key in ("hni_weight", "stc_weight"):
        if getattr(cfg.loss, key) <= 0:
            raise ValueError(
                f"config key 'loss.{key}': got {getattr(cfg.loss, key)!r}; it is the weight the "
                "variants that turn the term on use, so it must be > 0"
            )
    return cfg


def parse_variants(text: str) -> list[Variant]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANT_BY_KEY]
    if unknown or not keys:
        raise ValueError(f"variants {text!r}: expected a comma list of {', '.join(VARIANT_BY_KEY)}")
    return [VARIANT_BY_KEY[k] for k in dict.fromkeys(keys)]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def variant_config(cfg: RunConfig, variant: Variant, seed: int) -> RunConfig:
    """One run's config: the term weights of the variant (the base weight when on, 0 when off) and the seed."""
    loss = replace(
        cfg.loss,
        hni_weight=cfg.loss.hni_weight if variant.hni else 0.0,
        stc_weight=cfg.loss.stc_weight if variant.stc else 0.0,
    )
    return replace(cfg, seed=seed, loss=loss, train=replace(cfg.train, seed=seed))


# ----------------------------------------------------------------------------------------------- data
def teacher_annotation(seed_row: dict, prompt_hash: str) -> dict:
    """A `seed` row as a generation-1 `annotations` row written by the scene-graph teacher."""
    from cycle.annotate.schema import to_target_json

    return {
        "id": seed_row["id"],
        "generation": GENERATION,
        **{k: list(seed_row[k] or []) for k in ("desc", "neg_desc", "tags", "neg_tags")},
        "raw_output": to_target_json(seed_row),
        "status": "ok",
        "reason": "",
        "attempts": 1,
        "annotator": TEACHER,
        "prompt_hash": prompt_hash,
        "score": None,
    }


def prepare_store(cfg: RunConfig, store_uri: str | Path, progress: bool = True) -> dict:
    """Build the data (or find it built) and make the teacher records generation 1; returns the pins.

    Idempotent: a second call finds the rows and the `gen-001` tag and writes nothing.
    """
    from cycle.annotate.schema import prompt_hash
    from cycle.data.emoji import build_emoji_scenes
    from cycle.store import Store, gen_tag

    store = Store(store_uri)
    build_emoji_scenes(cfg.data.emoji, store, progress=progress, write_batch=cfg.store.write_batch)
    tag = gen_tag(GENERATION)
    if tag not in store.tags("annotations"):
        ph = prompt_hash()
        store.insert_new("annotations", [teacher_annotation(r, ph) for r in store.read("teacher").to_pylist()])
        store.tag("annotations", tag)
    pins = {"samples_version": store.table("samples").version, "annotations_version": store.tags("annotations")[tag]}
    train_ids = store.ids("samples", "split = 'train'", version=pins["samples_version"])
    annotated = store.ids(
        "annotations", f"generation = {GENERATION} AND status = 'ok'", version=pins["annotations_version"]
    )
    if not train_ids <= annotated:
        raise ValueError(
            f"{len(train_ids - annotated)} of {len(train_ids)} training scenes have no teacher "
            f"annotation in {store.uri}: build into a fresh --work directory"
        )
    pins["n_train"] = len(train_ids)
    return pins


# ----------------------------------------------------------------------------------------------- runs
def run_identity(cfg: RunConfig) -> dict:
    """The config sections a run's result depends on (a new LVLM setting does not make old runs stale)."""
    return {
        "data": to_dict(cfg.data),
        "clip": to_dict(cfg.clip),
        "loss": to_dict(cfg.loss),
        "train": to_dict(cfg.train),
        "eval": to_dict(cfg.eval),
        "seed": cfg.seed,
        "device": cfg.device,
    }


def shared_sections(cfg: RunConfig) -> dict:
    """The parts of the config every run shares, as plain dicts (what the report shows)."""
    return {
        "data": {"source": cfg.data.source, "emoji": to_dict(cfg.data.emoji)},
        "clip": to_dict(cfg.clip),
        "loss": to_dict(cfg.loss),
        "train": to_dict(cfg.train),
        "eval": to_dict(cfg.eval),
        "cpu_threads": cfg.cpu_threads,
    }


def run_variant(
    cfg: RunConfig,
    store_uri: str | Path,
    pins: dict,
    variant: Variant,
    seed: int,
    run_dir: str | Path,
    progress: bool = True,
) -> dict:
    """Train and evaluate one (variant, seed); returns `result.json`'s content (reused when already there)."""
    from cycle.clip.train import train_clip
    from cycle.evaluate import evaluate_clip
    from cycle.files import write_json_atomic
    from cycle.store import Store

    run_cfg = variant_config(cfg, variant, seed)
    run_dir = Path(run_dir)
    fp = fingerprint(
        run_identity(run_cfg), {k: pins[k] for k in ("samples_version", "annotations_version")}, variant.key
    )
    done = run_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("fingerprint") != fp:
            raise ValueError(f"{done} was made with another config or data; use a fresh --work directory")
        return result
    if run_cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(run_cfg.cpu_threads)
    start = time.perf_counter()
    model = train_clip(
        run_cfg,
        store_uri,
        run_dir / "clip",
        pins["samples_version"],
        annotations_version=pins["annotations_version"] if variant.teacher else None,
        generation=GENERATION if variant.teacher else None,
        progress=progress,
    )
    trained = time.perf_counter()
    metrics = evaluate_clip(
        model,
        Store(store_uri),
        None,
        run_cfg.eval,
        samples_version=pins["samples_version"],
        out_json=run_dir / "metrics.json",
        progress=progress,
    )
    result = {
        "variant": variant.key,
        "seed": seed,
        "fingerprint": fp,
        "train_s": trained - start,
        "eval_s": time.perf_counter() - trained,
        "metrics": metrics,
        "train_summary": json.loads((model / "train_summary.json").read_text()),
    }
    write_json_atomic(done, result, indent=1)
    shutil.rmtree(run_dir / "clip" / "checkpoints", ignore_errors=True)  # the final model stays
    return result


def run_ablation(
    cfg: RunConfig,
    work: str | Path,
    variants: Iterable[Variant],
    seeds: Sequence[int],
    progress: bool = True,
    log: Callable[[str], None] = print,
    runs: str = "runs",
) -> tuple[dict, list[dict]]:
    """Every (seed, variant) run, one at a time, seed-major (a cut-short ablation still has whole seeds)."""
    work = Path(work)
    pins = prepare_store(cfg, work / "lance", progress)
    results = []
    for seed in seeds:
        for v in variants:
            result = run_variant(cfg, work / "lance", pins, v, seed, work / runs / f"{v.key}-s{seed}", progress)
            log(
                f"({v.key}) {v.label}, seed {seed}: train {result['train_s']:.0f} s, "
                + ", ".join(f"{title} {result['metrics'].get(key, float('nan')):.3f}" for key, title in METRICS[:3])
            )
            results.append(result)
    return pins, results


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "emoji.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="a,b,c,d,e")
    ap.add_argument("--work", default=str(REPO / "generations" / "evidence-loss"))
    ap.add_argument("--runs", default="runs", help="folder of the runs under --work (one per set of settings)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "evidence_loss.md"))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the config's cpu_threads)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config key=value")
    args = ap.parse_args(argv)
    try:
        cfg = base_config(args.config, args.overrides, args.threads)
        variants, seeds = parse_variants(args.variants), parse_seeds(args.seeds)
    except ValueError as err:
        ap.error(str(err))
    start = time.perf_counter()
    pins, results = run_ablation(cfg, args.work, variants, seeds, progress=not args.no_progress, runs=args.runs)
    wall = time.perf_counter() - start
    command = "python benchmarks/evidence_loss.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown_report(shared_sections(cfg), pins, results, wall, cfg.cpu_threads, command.strip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
