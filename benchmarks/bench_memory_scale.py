"""Is memory flat in the data size? Peak RSS of ingest, annotation and the train index at two table sizes.

    python benchmarks/bench_memory_scale.py                      # every part at 20,000 and 200,000 rows
    python benchmarks/bench_memory_scale.py --part index         # one part (the others' figures are kept)
    python benchmarks/bench_memory_scale.py --rows 2000 20000    # other sizes (a quick look)

Issue 12's target: each part's peak RSS at 200,000 rows <= 1.3x its peak at 20,000 rows. Every
measurement runs in a fresh subprocess and reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` at its end;
the RSS after the imports (before any work) is recorded beside it, so the table also shows what the work
itself added. The data: 8x8 PNGs (64 distinct pictures, so the disk stays small: ~20 MB per 200,000 rows),
ids `r0000000`..., one parquet source per size, under `--workdir`.

The parts:
- ingest: `cycle.data.ingest.ingest` of the parquet source into a fresh store (the duplicate-id check,
  the image checks, batched commits of `store.write_batch` rows).
- annotate: `cycle.annotate.run.annotate_generation` of generation 1 with the `openai` backend against the
  loopback chat-completions server of `tests/openai_server.py` (run in its own process, not measured), so
  the model's cost does not dominate. The samples carry scene graphs (one object each, in `meta` as the
  built-in dataset stores them), so the pass's quality report reads every row's facts. The pass resumes
  one in which all but `--annotate-new` rows (2,000) are already annotated by the same annotator (written
  before the measured process starts): what scales with the table is the bookkeeping (the to-do
  selection over every row, the scan, the statistics and the quality pass over the whole generation);
  the write path runs over the new rows. `--annotate-new 0` annotates every row through the server.
- annotate-steps (diagnostic, not a target): the pieces of that pass alone, each in its own process on
  the annotated table, after one warm-up filtered scan (Lance's scan machinery costs a fixed ~100 MB the
  first time), its peak read from `VmHWM` reset after the warm-up: the to-do and done id sets,
  `generation_stats`, `annotation_quality`.
- index: what one training rank builds before its first step: `cycle.data.loader.PairDataset` over the
  train split joined with generation 1's annotations, a `ResumableSampler` and `make_loader`, then 4
  batches of 64 drawn (workers: 0). Same table as annotate.

Writes `benchmarks/results/memory_scale.json` (raw figures, merged per part) and `memory_scale.md`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
PARTS = ("ingest", "annotate", "annotate-steps", "index")
TARGETS = ("ingest", "annotate", "index")  # the parts issue 12's target is about
STEPS = ("todo-sets", "generation-stats", "quality")
TARGET_RATIO = 1.3
PICTURES = 64  # distinct 8x8 PNGs the rows cycle through
PARQUET_ROW_GROUP = 10_000
GENERATION = 1
INDEX_BATCH, INDEX_BATCHES = 64, 4
PREFILL_BATCH = 20_000  # rows per append when preparing a table
POSITIONS = ("left", "right", "top", "bottom", "center")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _hwm_mb() -> float:
    """Peak RSS since the last reset (`/proc/self/clear_refs`), from /proc/self/status."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------- the data
def pictures() -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(PICTURES):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def write_source(path: Path, rows: int) -> Path:
    """A parquet file of `rows` (id, image, caption) rows, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return path
    pics = pictures()
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("caption", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, rows, PARQUET_ROW_GROUP):
            idx = range(start, min(rows, start + PARQUET_ROW_GROUP))
            writer.write_table(
                pa.table(
                    {
                        "id": [f"r{i:07d}" for i in idx],
                        "image": [pics[i % PICTURES] for i in idx],
                        "caption": [f"a small picture of thing {i % 997}" for i in idx],
                    },
                    schema=schema,
                )
            )
    tmp.rename(path)
    return path


def write_scene_store(path: Path, rows: int):
    """A store whose `samples` are `rows` 8x8 pictures with one-object scene graphs in `meta` and the
    scene's description as alt-text (written directly, a batch at a time; ingest is measured apart)."""
    import hashlib

    import pyarrow as pa

    from cycle.data.emoji.language import describe
    from cycle.data.emoji.vocab import candidates
    from cycle.store import SAMPLES, Store

    store = Store(path)
    if store.has("samples") and store.count("samples") == rows:
        return store
    pics, names = pictures(), [o.name for o in candidates()]
    digests = [hashlib.sha256(p).hexdigest() for p in pics]
    for start in range(0, rows, PREFILL_BATCH):
        idx = range(start, min(rows, start + PREFILL_BATCH))
        scenes = [
            {
                "background": "white",
                "objects": [{"name": names[i % len(names)], "count": 1 + i % 3, "position": POSITIONS[i % 5]}],
            }
            for i in idx
        ]
        store.append(
            "samples",
            pa.table(
                {
                    "id": [f"r{i:07d}" for i in idx],
                    "image": [pics[i % PICTURES] for i in idx],
                    "alt_text": [describe(sc) for sc in scenes],
                    "source": ["bench"] * len(idx),
                    "split": ["train"] * len(idx),
                    "width": [8] * len(idx),
                    "height": [8] * len(idx),
                    "sha256": [digests[i % PICTURES] for i in idx],
                    "meta": [json.dumps({"scene": sc, "alt_noise": "clean"}) for sc in scenes],
                },
                schema=SAMPLES,
            ),
        )
    return store


def annotate_cfg(base_url: str):
    from cycle.config import AnnotateConfig, OpenAIBackendConfig

    return AnnotateConfig(
        backend="openai",
        openai=OpenAIBackendConfig(
            base_url=base_url, model="teacher-test", api_key_env="", concurrency=4, requests_per_minute=0
        ),
    )


def prefill_annotations(store, annotator: str, leave: int) -> int:
    """Generation-1 rows for every sample but the last `leave` (in scan order), as a finished pass by
    `annotator` would leave them. The table is made anew. Returns the rows written."""
    import pyarrow as pa

    from cycle.annotate.schema import prompt_hash
    from cycle.store import ANNOTATIONS

    if store.has("annotations"):
        store.db.drop_table("annotations")
    total = store.count("samples")
    keep, written, ph = total - leave, 0, prompt_hash()
    for rb in store.scan("samples", ["id", "alt_text"], batch_size=PREFILL_BATCH):
        n = min(rb.num_rows, keep - written)
        if n <= 0:
            break
        ids, alts = rb.column("id").to_pylist()[:n], rb.column("alt_text").to_pylist()[:n]
        table = pa.table(
            {
                "id": ids,
                "generation": [GENERATION] * n,
                "desc": [[f"the image shows {a}."] for a in alts],
                "neg_desc": [[f"the image shows no {a}."] for a in alts],
                "tags": [[a] for a in alts],
                "neg_tags": [[f"no {a}"] for a in alts],
                "raw_output": ["{}"] * n,
                "status": ["ok"] * n,
                "reason": [None] * n,
                "attempts": [1] * n,
                "annotator": [annotator] * n,
                "prompt_hash": [ph] * n,
                "score": [None] * n,
            },
            schema=ANNOTATIONS,
        )
        store.append("annotations", table)
        written += n
    return written


# ----------------------------------------------------------------------------- the measured processes
def child_ingest(work: Path) -> dict:
    from cycle.config import DataConfig
    from cycle.data.ingest import ingest
    from cycle.store import Store

    base = _current_rss_mb()
    store = Store(work / "lance-ingest")
    report = ingest(work / "source.parquet", store, kind="parquet", cfg=DataConfig(), progress=False)
    return {"baseline_rss_mb": base, "ingested": report.ingested, "rejected": report.rejected_total}


def child_annotate(work: Path, base_url: str) -> dict:
    from cycle.annotate.run import annotate_generation
    from cycle.store import Store

    base = _current_rss_mb()
    store = Store(work / "lance")
    stats = annotate_generation(
        annotate_cfg(base_url), None, store, store.version("samples"), GENERATION, work / "annotate", progress=False
    )
    quality = stats.get("quality") or {}
    return {
        "baseline_rss_mb": base,
        "written": stats["this_run"]["written"],
        "quality_scenes": quality.get("scenes"),
        "annotation_f1": quality.get("annotation", {}).get("f1"),
    }


def child_step(work: Path, step: str) -> dict:
    """One piece of the annotation pass alone (see the module docstring), after a warm-up filtered scan."""
    from cycle.store import Store

    store = Store(work / "lance")
    store.count("samples", "split = 'train'")
    store.read("samples", ["id"], "id IN ('r0000000')")
    base = _current_rss_mb()
    with open("/proc/self/clear_refs", "w") as fh:  # the peak from here on: the warm-up's is not the step's
        fh.write("5")
    if step == "todo-sets":
        todo = store.ids("samples", "split IN ('train')") - store.ids("annotations", f"generation = {GENERATION}")
        out = {"todo": len(todo)}
    elif step == "generation-stats":
        from cycle.annotate.run import generation_stats

        out = {"rows": generation_stats(store, GENERATION).get("rows")}
    else:
        from cycle.annotate.quality import annotation_quality

        out = {"scenes": annotation_quality(store, store.version("samples"), GENERATION)["scenes"]}
    return {"baseline_rss_mb": base, "peak_rss_mb": round(_hwm_mb(), 1), **out}


def child_index(work: Path) -> dict:
    from cycle.data.loader import PairDataset, make_loader
    from cycle.data.sampler import ResumableSampler

    base = _current_rss_mb()
    dataset = PairDataset(work / "lance", "train", generation=GENERATION)
    sampler = ResumableSampler(len(dataset), seed=0, batch_size=INDEX_BATCH)
    loader = make_loader(dataset, sampler=sampler)
    drawn = 0
    for drawn, _batch in enumerate(loader, 1):
        if drawn == INDEX_BATCHES:
            break
    return {"baseline_rss_mb": base, "dataset_rows": len(dataset), "batches": drawn}


def run_child(part: str, work: Path, base_url: str = "", step: str = "") -> dict:
    started = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", part, "--workdir", str(work), "--base-url", base_url, "--step", step],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"{part} at {work.name}: the measured process failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.time() - started, 1)
    return result


# ------------------------------------------------------------------------------------- the loopback API
def serve() -> None:
    """The chat-completions server of the tests, answering the four formulas about the alt-text."""
    sys.path.insert(0, str(REPO / "tests"))
    from openai_server import ChatServer, echo_alt_text

    answer = echo_alt_text

    with ChatServer(answer) as server:
        server.requests = server.answered = _Discard()  # the server keeps no bodies: it is not the one measured
        print(server.base_url, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin


class _Discard(list):
    def append(self, item) -> None:
        pass


def start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        env=subprocess_env(),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, proc.stdout.readline().strip()


# ------------------------------------------------------------------------------------------ the driver
def measure(part: str, rows: int, workdir: Path, annotate_new: int) -> dict:
    work = workdir / f"rows-{rows}"
    work.mkdir(parents=True, exist_ok=True)
    if part == "ingest":
        write_source(work / "source.parquet", rows)
        shutil.rmtree(work / "lance-ingest", ignore_errors=True)
        result = run_child("ingest", work)
        shutil.rmtree(work / "lance-ingest", ignore_errors=True)
        return result
    store = write_scene_store(work / "lance", rows)
    if part == "annotate":
        server, base_url = start_server()
        try:
            from cycle.annotate.backends.openai_backend import OpenAIBackend

            annotator = OpenAIBackend(annotate_cfg(base_url).openai).fingerprint
            leave = rows if annotate_new <= 0 else min(annotate_new, rows)
            prefilled = prefill_annotations(store, annotator, leave)
            result = run_child("annotate", work, base_url)
        finally:
            server.stdin.close()
            server.wait(timeout=30)
        result["prefilled"] = prefilled
        return result
    if store.count("annotations", f"generation = {GENERATION}") < rows:  # run alone: annotated as a pass would
        prefill_annotations(store, "bench-prefill", 0)
    if part == "annotate-steps":
        return {step: run_child("annotate-steps", work, step=step) for step in STEPS}
    return run_child("index", work)


def _rows_md(label: str, runs: dict, target: bool) -> list[str]:
    lines, sizes = [], sorted(runs, key=int)
    for rows in sizes:
        r = runs[rows]
        ratio, met = "", ""
        if rows != sizes[0]:
            value = r["peak_rss_mb"] / runs[sizes[0]]["peak_rss_mb"]
            ratio = f"{value:.2f}"
            met = ("yes" if value <= TARGET_RATIO else "**no**") if target else "(diagnostic)"
        work = r["peak_rss_mb"] - r["baseline_rss_mb"]
        lines.append(
            f"| {label} | {int(rows):,} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | {work:.0f} | "
            f"{r['wall_s']:.0f} | {ratio} | {met} |"
        )
    return lines


def write_results(figures: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory_scale.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Peak RSS against the table size (issue 12: memory flat in the data size)",
        "",
        "Written by `benchmarks/bench_memory_scale.py` (see its docstring for what each part runs). Each figure",
        'is one fresh process\'s peak RSS (`ru_maxrss`); "work" is the peak less the RSS after its imports',
        "(annotate-steps: the peak after its warm-up scan, less the RSS then).",
        f"Target: peak at the larger size <= {TARGET_RATIO}x the peak at the smaller.",
        "",
        "| part | rows | peak RSS (MB) | baseline (MB) | work (MB) | wall (s) | ratio of peaks | target met |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for part in PARTS:
        runs = figures.get(part, {})
        if part == "annotate-steps":
            for step in STEPS:
                lines += _rows_md(f"annotate: {step}", {n: r[step] for n, r in runs.items() if step in r}, False)
        else:
            lines += _rows_md(part, runs, part in TARGETS)
    lines += ["", "Details per run (JSON): `benchmarks/results/memory_scale.json`.", ""]
    (OUT / "memory_scale.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=(*PARTS, "all"), default="all")
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hqclip-bench-memory"))
    ap.add_argument("--annotate-new", type=int, default=2000, help="rows the annotate pass writes (0: all)")
    ap.add_argument("--clean", action="store_true", help="remove the work folder (sources, stores) at the end")
    ap.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    ap.add_argument("--step", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve()
    if args.child:
        started = time.time()
        if args.child == "annotate":
            result = child_annotate(args.workdir, args.base_url)
        elif args.child == "annotate-steps":
            result = child_step(args.workdir, args.step)
        else:
            result = {"ingest": child_ingest, "index": child_index}[args.child](args.workdir)
        result.setdefault("peak_rss_mb", round(_peak_rss_mb(), 1))
        result["seconds"] = round(time.time() - started, 1)
        result["baseline_rss_mb"] = round(result["baseline_rss_mb"], 1)
        print(json.dumps(result))
        return None

    path = OUT / "memory_scale.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    for part in PARTS if args.part == "all" else (args.part,):
        for rows in args.rows:
            result = measure(part, rows, args.workdir, args.annotate_new)
            figures.setdefault(part, {})[str(rows)] = result
            for label, r in result.items() if part == "annotate-steps" else [(part, result)]:
                print(f"{label} at {rows:,} rows: peak RSS {r['peak_rss_mb']:.0f} MB ({r['wall_s']:.0f} s)", flush=True)
            write_results(figures)
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
