"""Evidence for the HQ-CLIP loss (issue 3): which terms help a CLIP trained on good annotations?

    python benchmarks/evidence_loss.py [--config configs/emoji.yaml] [--seeds 0,1,2] [--variants a,b,c,d,e]
                                       [--work generations/evidence-loss] [--out benchmarks/results/evidence_loss.md]
                                       [--threads 1] [key=value ...]

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

Every run writes `<work>/runs/<variant>-s<seed>/result.json` last; a rerun skips finished runs (and a killed
training resumes from its checkpoint), and refuses results made with another config. Prints the markdown
table and writes it to `--out`. Tune on `val` only, never on the test splits.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cycle.config import RunConfig, fingerprint, load_config, to_dict  # noqa: E402

TEACHER = "teacher:scene-graph"
GENERATION = 1


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    teacher: bool  # train on the teacher annotations (generation 1); False: raw alt-text only
    hni: bool
    stc: bool


VARIANTS = (
    Variant("a", "alt-text only", False, False, False),
    Variant("b", "teacher, L_clip", True, False, False),
    Variant("c", "teacher, L_clip + HNI", True, True, False),
    Variant("d", "teacher, L_clip + STC", True, False, True),
    Variant("e", "teacher, all (HNI + STC)", True, True, True),
)
VARIANT_BY_KEY = {v.key: v for v in VARIANTS}

# (metric key, column title): what the issue asks for, held-out first, val last.
METRICS = (
    ("test_zeroshot/top1", "zero-shot top-1"),
    ("test_retrieval/retrieval_mean_r1", "retrieval R@1"),
    ("test_negatives/acc", "neg. acc"),
    ("test_negatives/acc_object", "neg. object"),
    ("test_negatives/acc_relation", "neg. relation"),
    ("test_negatives/acc_count", "neg. count"),
    ("test_compositional/retrieval_mean_r1", "compositional R@1"),
    ("val/retrieval_mean_r1", "val R@1"),
)


# ----------------------------------------------------------------------------------------------- config
def base_config(config_path: str | Path, overrides: Sequence[str] = (), threads: int = 0) -> RunConfig:
    """The shared config: the file + overrides, every training scene seeded, checked for the ablation."""
    cfg = load_config(config_path, [*overrides, "data.emoji.seed_share=1.0"])
    if threads:
        cfg = replace(cfg, cpu_threads=threads)
    if cfg.data.source != "emoji-scenes":
        raise ValueError(f"config key 'data.source': got {cfg.data.source!r}; the ablation needs the built-in "
                         "emoji-scenes data (its scene-graph teacher annotates every training scene)")
    for key in ("hni_weight", "stc_weight"):
        if getattr(cfg.loss, key) <= 0:
            raise ValueError(f"config key 'loss.{key}': got {getattr(cfg.loss, key)!r}; it is the weight the "
                             "variants that turn the term on use, so it must be > 0")
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
    loss = replace(cfg.loss, hni_weight=cfg.loss.hni_weight if variant.hni else 0.0,
                   stc_weight=cfg.loss.stc_weight if variant.stc else 0.0)
    return replace(cfg, seed=seed, loss=loss, train=replace(cfg.train, seed=seed))


# ----------------------------------------------------------------------------------------------- data
def teacher_annotation(seed_row: dict, prompt_hash: str) -> dict:
    """A `seed` row as a generation-1 `annotations` row written by the scene-graph teacher."""
    from cycle.annotate.schema import to_target_json

    return {"id": seed_row["id"], "generation": GENERATION,
            **{k: list(seed_row[k] or []) for k in ("desc", "neg_desc", "tags", "neg_tags")},
            "raw_output": to_target_json(seed_row), "status": "ok", "reason": "", "attempts": 1,
            "annotator": TEACHER, "prompt_hash": prompt_hash, "score": None}


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
        store.insert_new("annotations", [teacher_annotation(r, ph) for r in store.read("seed").to_pylist()])
        store.tag("annotations", tag)
    pins = {"samples_version": store.table("samples").version, "annotations_version": store.tags("annotations")[tag]}
    train_ids = store.ids("samples", "split = 'train'", version=pins["samples_version"])
    annotated = store.ids("annotations", f"generation = {GENERATION} AND status = 'ok'",
                          version=pins["annotations_version"])
    if not train_ids <= annotated:
        raise ValueError(f"{len(train_ids - annotated)} of {len(train_ids)} training scenes have no teacher "
                         f"annotation in {store.uri}: build into a fresh --work directory")
    pins["n_train"] = len(train_ids)
    return pins


# ----------------------------------------------------------------------------------------------- runs
def run_variant(cfg: RunConfig, store_uri: str | Path, pins: dict, variant: Variant, seed: int,
                run_dir: str | Path, progress: bool = True) -> dict:
    """Train and evaluate one (variant, seed); returns `result.json`'s content (reused when already there)."""
    from cycle.clip.train import train_clip
    from cycle.evaluate import evaluate_clip
    from cycle.evaluate.run import write_json_atomic
    from cycle.store import Store

    run_cfg = variant_config(cfg, variant, seed)
    run_dir = Path(run_dir)
    fp = fingerprint(run_cfg, {k: pins[k] for k in ("samples_version", "annotations_version")}, variant.key)
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
    model = train_clip(run_cfg, store_uri, run_dir / "clip", pins["samples_version"],
                       annotations_version=pins["annotations_version"] if variant.teacher else None,
                       generation=GENERATION if variant.teacher else None, progress=progress)
    trained = time.perf_counter()
    metrics = evaluate_clip(model, Store(store_uri), None, run_cfg.eval, samples_version=pins["samples_version"],
                            out_json=run_dir / "metrics.json", progress=progress)
    result = {"variant": variant.key, "seed": seed, "fingerprint": fp, "train_s": trained - start,
              "eval_s": time.perf_counter() - trained, "metrics": metrics,
              "train_summary": json.loads((model / "train_summary.json").read_text())}
    write_json_atomic(result, done)
    shutil.rmtree(run_dir / "clip" / "checkpoints", ignore_errors=True)  # the final model stays
    return result


def run_ablation(cfg: RunConfig, work: str | Path, variants: Iterable[Variant], seeds: Sequence[int],
                 progress: bool = True, log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Every (seed, variant) run, one at a time, seed-major (a cut-short ablation still has whole seeds)."""
    work = Path(work)
    pins = prepare_store(cfg, work / "lance", progress)
    results = []
    for seed in seeds:
        for v in variants:
            result = run_variant(cfg, work / "lance", pins, v, seed, work / "runs" / f"{v.key}-s{seed}", progress)
            log(f"({v.key}) {v.label}, seed {seed}: train {result['train_s']:.0f} s, "
                + ", ".join(f"{title} {result['metrics'].get(key, float('nan')):.3f}" for key, title in METRICS[:3]))
            results.append(result)
    return pins, results


# ----------------------------------------------------------------------------------------------- report
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); the deviation is nan for a single value."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(results: Sequence[dict]) -> dict[str, dict]:
    """Per variant: seeds, mean and std of each metric, mean train / eval seconds."""
    out: dict[str, dict] = {}
    for v in VARIANTS:
        runs = sorted((r for r in results if r["variant"] == v.key), key=lambda r: r["seed"])
        if not runs:
            continue
        row = {"seeds": [r["seed"] for r in runs], "train_s": statistics.fmean(r["train_s"] for r in runs),
               "eval_s": statistics.fmean(r["eval_s"] for r in runs)}
        for key, _ in METRICS:
            row[key] = mean_std([r["metrics"][key] for r in runs if key in r["metrics"]])
        out[v.key] = row
    return out


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_report(cfg: RunConfig, pins: dict, results: Sequence[dict], wall_s: float,
                    command: str = "") -> str:
    summary = summarise(results)
    lines = ["# Loss ablation on emoji scenes (issue 3)", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    seeds = sorted({r["seed"] for r in results})
    lines += [f"Mean ± sample std over seeds {', '.join(map(str, seeds))} (seed = `seed` = `train.seed`; one "
              f"dataset build). {pins['n_train']} training scenes, every one with a teacher annotation "
              f"(samples@v{pins['samples_version']}, annotations@v{pins['annotations_version']} = gen-001). "
              f"Wall time of the whole ablation: {wall_s / 60:.1f} min ({len(results)} runs, "
              f"{cfg.cpu_threads or 'default'} torch thread(s)).", ""]
    head = ["variant", *[title for _, title in METRICS], "train s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in VARIANTS:
        if v.key in summary:
            row = summary[v.key]
            lines.append(f"| ({v.key}) {v.label} | " + " | ".join(_cell(*row[k]) for k, _ in METRICS)
                         + f" | {row['train_s']:.0f} |")
    lines += ["", "Per seed:", "", "| variant | seed | " + " | ".join(t for _, t in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        lines.append(f"| ({r['variant']}) | {r['seed']} | "
                     + " | ".join(f"{r['metrics'].get(k, math.nan):.3f}" for k, _ in METRICS) + " |")
    sections = {"data": {"source": cfg.data.source, "emoji": to_dict(cfg.data.emoji)}, "clip": to_dict(cfg.clip),
                "loss": to_dict(cfg.loss), "train": to_dict(cfg.train), "eval": to_dict(cfg.eval),
                "cpu_threads": cfg.cpu_threads}
    lines += ["", "Config shared by every run (a variant sets `loss.hni_weight` / `loss.stc_weight` to 0 for the "
              "terms it leaves out; (a) trains with `generation=None`, which turns both off):", "", "```json",
              json.dumps(sections, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "emoji.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="a,b,c,d,e")
    ap.add_argument("--work", default=str(REPO / "generations" / "evidence-loss"))
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
    pins, results = run_ablation(cfg, args.work, variants, seeds, progress=not args.no_progress)
    wall = time.perf_counter() - start
    # A resumed ablation reports the summed run times, not the time of this last call.
    wall = max(wall, sum(r["train_s"] + r["eval_s"] for r in results))
    command = "python benchmarks/evidence_loss.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown_report(cfg, pins, results, wall, command.strip())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
