"""Annotation on Ray against the local pass, on the tiny config: what the engine costs.

`local`: `annotate_generation` in this process with 2 torch threads. `ray`: the same call with
`cluster.executor=ray` on a local Ray cluster of two nodes (a head and a worker, 1 CPU each; started
once, before the timings, like a running cluster), 2 actors of 1 CPU and 1 thread. Both annotate the
same training images of the tiny emoji-scenes set (`n_train` raised so start-up is not all that is
timed) with an untrained LLaVA of the tiny config's shape (greedy; both generate the same tokens).
Each pass is a new generation, so nothing is skipped; passes alternate (local, ray, local, ray, ...)
because other jobs share these cores. Every pass is timed whole: model loading (actors start), the
pass, the staging merge.

    python benchmarks/bench_ray_annotate.py [--train 800] [--repeats 2] [--tokens 64]

Writes benchmarks/results/ray_annotate.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
PAPER_IMAGES = 150_000_000  # the paper's VLM-150M pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=800, help="training images annotated per pass")
    ap.add_argument("--repeats", type=int, default=2, help="passes per executor, interleaved")
    ap.add_argument("--tokens", type=int, default=0, help="max new tokens (0: the tiny config's)")
    ap.add_argument("--rows-per-shard", type=int, default=64)
    ap.add_argument("--local-threads", type=int, default=2, help="torch threads of the local pass")
    args = ap.parse_args()

    import ray
    import torch
    from bench_annotate import build_demo_llava
    from ray.cluster_utils import Cluster

    from cycle.annotate.run import annotate_generation
    from cycle.config import load_config
    from cycle.data.emoji import build_emoji_scenes
    from cycle.store import Store

    overrides = ["cluster.executor=ray", f"cluster.annotate.rows_per_shard={args.rows_per_shard}"]
    overrides += [f"data.emoji.n_train={args.train}", "cluster.annotate.actors=2", "cluster.annotate.cpus_per_actor=1"]
    if args.tokens:
        overrides.append(f"annotate.max_new_tokens={args.tokens}")
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-annotate-"))
    model_dir = build_demo_llava(work, config="tiny.yaml")
    store = Store(work / "lance")
    build_emoji_scenes(cfg.data.emoji, store, progress=False)
    version = store.version("samples")
    n_train = store.count("samples", "split = 'train'")

    torch.set_num_threads(args.local_threads)  # local: one process, both cores
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()

    params = sum(p.numel() for p in _load(model_dir).parameters())
    passes: list[dict] = []
    try:
        for repeat in range(args.repeats):
            for executor in ("local", "ray"):
                generation = len(passes) + 1
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                stats = annotate_generation(
                    cfg.annotate,
                    model_dir,
                    store,
                    version,
                    generation,
                    work / f"out-{generation}",
                    progress=False,
                    device="cpu",
                    cluster=cfg.cluster if executor == "ray" else None,
                )
                seconds = time.perf_counter() - t0
                assert stats["rows"] == n_train, stats
                passes.append(
                    {
                        "executor": executor,
                        "repeat": repeat,
                        "images": n_train,
                        "seconds": round(seconds, 2),
                        "images_per_s": round(n_train / seconds, 2),
                        "load_avg_1min_before": round(load, 2),
                    }
                )
                print(passes[-1], flush=True)
                write(store, passes, args, cfg, overrides, params)  # after every pass: a cut-short run still reports
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(report(json.loads((RESULTS / "ray_annotate.json").read_text())))


def write(store, passes: list[dict], args, cfg, overrides: list[str], params: int) -> None:
    # greedy, so the passes agree but for near-ties that thread counts and batch padding tip (an untrained
    # model's logits are nearly flat): the share of images whose raw output equals the first pass's
    def outputs(g: int) -> dict:
        rows = store.read("annotations", ["id", "raw_output"], f"generation = {g}").to_pylist()
        return {r["id"]: r["raw_output"] for r in rows}

    first = outputs(1)
    for g, p in enumerate(passes, 1):
        other = outputs(g)
        p["same_raw_output_as_pass_1"] = round(sum(other[i] == o for i, o in first.items()) / len(first), 3)
    done = {e: [p["images_per_s"] for p in passes if p["executor"] == e] for e in ("local", "ray")}
    best = {e: max(v) if v else None for e, v in done.items()}
    pairs = [
        round(r["images_per_s"] / lo["images_per_s"], 3)
        for lo, r in zip(passes[0::2], passes[1::2])  # each ray pass against the local pass just before it
    ]
    result = {
        "config": "configs/tiny.yaml",
        "overrides": overrides,
        "model_dir_params": params,
        "max_new_tokens": cfg.annotate.max_new_tokens,
        "batch_size": cfg.annotate.batch_size,
        "local_threads": args.local_threads,
        "passes": passes,
        "complete": len(passes) == 2 * args.repeats,
        "best_images_per_s": best,
        "ratio_ray_over_local_per_pair": pairs,
        "ratio_best": round(best["ray"] / best["local"], 3) if best["ray"] and best["local"] else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_annotate.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "ray_annotate.md").write_text(report(result))


def _load(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir)


def report(r: dict) -> str:
    lines = [
        "# Annotation on Ray against the local pass (tiny config)",
        "",
        f"`python benchmarks/bench_ray_annotate.py` — written by the script. `local`: one process, "
        f"{r['local_threads']} torch threads;",
        "`ray`: a local Ray cluster of two nodes (head + worker, 1 CPU each), 2 actors of 1 CPU / 1 thread,",
        "reading with lance-ray, shards committed to staging and merged in one commit. Each pass is timed",
        "whole (model load or actor start-up, the pass, the merge), on an untrained LLaVA of the tiny config's",
        f"shape ({r['model_dir_params']:,} parameters), greedy, max_new_tokens {r['max_new_tokens']}, "
        f"batch {r['batch_size']}. Overrides: `{' '.join(r['overrides'])}`.",
        "",
        "| pass | executor | images | seconds | images/s | load avg before | raw outputs as pass 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(r["passes"], 1):
        lines.append(
            f"| {i} | {p['executor']} | {p['images']} | {p['seconds']} | {p['images_per_s']} "
            f"| {p['load_avg_1min_before']} | {p['same_raw_output_as_pass_1']:.1%} |"
        )
    if not r["complete"]:
        lines += ["", "(cut short: fewer passes than asked for)"]
    lines += [
        "",
        f"Ray / local, each ray pass against the local pass before it: {r['ratio_ray_over_local_per_pair']}; "
        f"best against best: **{r['ratio_best']}** (target >= 0.8).",
        f"Machine: {r['machine']}. Greedy outputs differ only where an untrained model's near-ties are tipped",
        "by thread count or batch padding (the last column).",
        "",
        "## 150M images on N GPUs (arithmetic, not a measurement)",
        "",
        "Images/s per GPU were **not measured here** (no GPU on this machine). With r images/s per GPU",
        f"(one vLLM actor per GPU) and Ray's overhead as above, a {PAPER_IMAGES / 1e6:.0f}M-image pass takes",
        f"{PAPER_IMAGES:,} / (r x N) seconds; for example (r assumed, not measured):",
        "",
        "| r (images/s per GPU, assumed) | N = 8 | N = 64 | N = 256 |",
        "|---|---|---|---|",
    ]
    for rate in (5, 20, 50):
        cells = [f"{PAPER_IMAGES / (rate * n) / 86400:.1f} days" for n in (8, 64, 256)]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Multiply by 1 / (Ray over local) for the engine's overhead, if it carries over to GPUs. With",
        "`rows_per_shard` S, a lost actor costs at most S images of work; the controller commits",
        "one staging version per shard (150M / S commits: S = 4096 gives ~37k).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
