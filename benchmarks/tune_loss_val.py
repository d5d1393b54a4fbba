"""Issue 10 on the VALIDATION split: the STC head, paired HNI negatives and short tag texts, one change at a time.

    python benchmarks/tune_loss_val.py [--config configs/emoji.yaml] [--seeds 0] [--variants old,cosine,...]
                                       [--work generations/tune-loss] [--threads 1]
                                       [--out benchmarks/results/tune_loss_val.md] [key=value ...]

The data and the teacher generation are `evidence_loss.py`'s (every training scene annotated by the
scene-graph teacher, generation 1); each variant is a set of loss overrides on top of the config, trained
with `train_clip` and evaluated on `val` only (never a test split):

    val/retrieval_mean_r1, val/acc (positive vs minimal-edit negative), val/tag_map and val/stc_loss (the
    STC head against the vocabulary tags the val captions name), and val_single/top1: zero-shot
    classification of the val scenes that show one kind of object (label = its name, the config's
    templates): the zero-shot check that short texts are for, without looking at test_zeroshot.
    From the training log: the STC term's fall from the first to the last logged step.

Every run writes `<work>/<runs>/<variant>-s<seed>/result.json` last and is reused by a rerun with the
same settings. Prints the markdown table and writes it (and the raw results as .json) to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evidence_loss import REPO, base_config, prepare_store, run_identity  # noqa: E402  (sets the env too)

from cycle.config import RunConfig, fingerprint, load_config  # noqa: E402

# The loss before issue 10 ("old"), then one change at a time on top of the new defaults.
OLD = ["loss.stc_head=linear", "loss.hni_negatives=independent", "loss.neg_max_edit_words=0"]
VARIANTS = {
    "old": OLD,
    "cosine": ["loss.hni_negatives=independent", "loss.neg_max_edit_words=0"],  # the new STC head only
    "paired": [],  # the new defaults: cosine head, paired negatives, edit bound
    "short": ["loss.short_text_prob=0.2"],
    "pair-mode": ["loss.hni_mode=pair"],
}
COLUMNS = (
    ("val/retrieval_mean_r1", "val R@1"),
    ("val/acc", "val neg. acc"),
    ("val_single/top1", "val zero-shot top-1"),
    ("val/tag_map", "val tag mAP"),
    ("val/stc_loss", "val STC"),
    ("stc_fall", "STC fall in training"),
)


def variant_config(config: str, overrides: Sequence[str], variant: str, seed: int, threads: int) -> RunConfig:
    cfg = base_config(config, [*overrides, *VARIANTS[variant]], threads)
    return replace(cfg, seed=seed, train=replace(cfg.train, seed=seed))


def single_object_set(store, samples_version):
    """The val scenes with one kind of object, labelled by its name (a zero-shot set from val)."""
    from cycle.evaluate.datasets import build_set

    table = store.read("samples", ["id", "image", "meta"], where="split = 'val'", version=samples_version)
    rows = []
    for id_, image, meta in zip(*(table.column(c).to_pylist() for c in ("id", "image", "meta"))):
        objects = json.loads(meta)["scene"]["objects"]
        if len(objects) == 1:
            rows.append((id_, image, {"label": objects[0]["name"]}))
    return build_set("val_single", sorted(rows, key=lambda r: r[0]))


def stc_fall(log: Path, by_epoch: bool = False) -> float | None:
    """The STC term's relative fall over a training: first to last logged step, or (`by_epoch`) the mean of
    the first epoch's logged steps to the mean of the last epoch's (one logged step is one batch: noisy)."""
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if "stc_loss" in r]
    if not steps:
        return None
    if by_epoch:
        first = [r["stc_loss"] for r in steps if r["epoch"] == steps[0]["epoch"]]
        last = [r["stc_loss"] for r in steps if r["epoch"] == steps[-1]["epoch"]]
        start, end = sum(first) / len(first), sum(last) / len(last)
    else:
        start, end = steps[0]["stc_loss"], steps[-1]["stc_loss"]
    return (start - end) / start


def run_one(cfg: RunConfig, work: Path, pins: dict, variant: str, seed: int, runs: str) -> dict:
    from cycle.clip.saved import load_clip
    from cycle.clip.train import train_clip
    from cycle.evaluate import evaluate_clip
    from cycle.evaluate.run import evaluate_set
    from cycle.files import write_json_atomic
    from cycle.store import Store

    run_dir = work / runs / f"{variant}-s{seed}"
    fp = fingerprint(run_identity(cfg), {k: pins[k] for k in ("samples_version", "annotations_version")})
    done = run_dir / "result.json"
    if done.is_file() and json.loads(done.read_text()).get("fingerprint") == fp:
        return json.loads(done.read_text())
    if cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    start = time.perf_counter()
    model = train_clip(
        cfg,
        work / "lance",
        run_dir / "clip",
        pins["samples_version"],
        annotations_version=pins["annotations_version"],
        generation=1,
        progress=False,
    )
    train_s = time.perf_counter() - start
    store = Store(work / "lance")
    metrics = evaluate_clip(model, store, ["val"], cfg.eval, samples_version=pins["samples_version"], progress=False)
    clip, preprocess, tokenizer, _ = load_clip(model)
    single = evaluate_set(clip, tokenizer, preprocess, single_object_set(store, pins["samples_version"]), cfg.eval)
    metrics.update({f"val_single/{k}": v for k, v in single.items()})
    metrics["stc_fall"] = stc_fall(run_dir / "clip" / "log.jsonl")
    result = {"variant": variant, "seed": seed, "fingerprint": fp, "train_s": train_s, "metrics": metrics}
    write_json_atomic(done, result, indent=1)
    return result


def table(results: list[dict], variants: Sequence[str]) -> str:
    lines = [
        "| variant | overrides | " + " | ".join(t for _, t in COLUMNS) + " | train s |",
        "|" + "---|" * (len(COLUMNS) + 3),
    ]
    for v in variants:
        rows = [r for r in results if r["variant"] == v]
        cells = []
        for key, _ in COLUMNS:
            vals = [r["metrics"][key] for r in rows if r["metrics"].get(key) is not None]
            if not vals:
                cells.append("n/a")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
        secs = statistics.mean(r["train_s"] for r in rows)
        lines.append(f"| {v} | `{' '.join(VARIANTS[v]) or '(defaults)'}` | " + " | ".join(cells) + f" | {secs:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "emoji.yaml"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default=str(REPO / "generations" / "tune-loss"))
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "tune_loss_val.md"))
    ap.add_argument("overrides", nargs="*", help="config key=value, shared by every variant")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    work = Path(args.work)
    start = time.perf_counter()
    pins = prepare_store(base_config(args.config, args.overrides, args.threads), work / "lance", progress=False)
    results = []
    for seed in seeds:
        for v in variants:
            cfg = variant_config(args.config, args.overrides, v, seed, args.threads)
            results.append(run_one(cfg, work, pins, v, seed, args.runs))
            m = results[-1]["metrics"]
            print(
                f"{v} s{seed}: "
                + ", ".join(f"{t} {m[k] if m.get(k) is not None else float('nan'):.3f}" for k, t in COLUMNS),
                flush=True,
            )
    loss = load_config(args.config).loss
    text = "\n".join(
        [
            "# Issue 10 on val: STC head, paired HNI negatives, short tag texts",
            "",
            f"Command: `python benchmarks/tune_loss_val.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
            "",
            f"Seeds {seeds} (mean ± sample std when more than one); {pins['n_train']} training scenes, every one "
            "with a scene-graph teacher annotation (generation 1). Val only: no test split was looked at. "
            f"Wall time of this call: {(time.perf_counter() - start) / 60:.1f} min (finished runs are reused).",
            "",
            "`old` is the loss before issue 10 (linear STC head, negatives drawn independently of the positive, "
            "no edit bound); `cosine` changes the head only; `paired` is the new defaults; `short` and "
            "`pair-mode` change one thing on top of `paired`.",
            "",
            table(results, variants),
            "",
            f"Loss defaults of {Path(args.config).name} at the time: `{json.dumps(vars(loss))}`",
            "",
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
