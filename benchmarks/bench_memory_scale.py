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
  the model's cost does not dominate. The pass resumes one in which all but `--annotate-new` rows (2,000)
  are already annotated by the same annotator (written before the measured process starts): what scales
  with the table is the bookkeeping (the to-do selection over every row, the scan, the statistics and the
  quality pass over the whole generation); the write path runs over the new rows. `--annotate-new 0`
  annotates every row through the server instead (slow: ~N/300 s).
- index: what one training rank builds before its first step: `cycle.data.loader.PairDataset` over the
  train split joined with generation 1's annotations, a `ResumableSampler` and `make_loader`, then 4
  batches of 64 drawn (workers: 0).

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

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
PARTS = ("ingest", "annotate", "index")
TARGET_RATIO = 1.3
PICTURES = 64  # distinct 8x8 PNGs the rows cycle through
PARQUET_ROW_GROUP = 10_000
GENERATION = 1
INDEX_BATCH, INDEX_BATCHES = 64, 4
PREFILL_BATCH = 20_000  # annotation rows per append when preparing an annotated table


def _env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    report = ingest(work / "source.parquet", Store(work / "lance"), kind="parquet", cfg=DataConfig(), progress=False)
    return {"baseline_rss_mb": base, "ingested": report.ingested, "rejected": report.rejected_total}


def child_annotate(work: Path, base_url: str) -> dict:
    from cycle.annotate.run import annotate_generation
    from cycle.store import Store

    base = _current_rss_mb()
    store = Store(work / "lance")
    stats = annotate_generation(
        annotate_cfg(base_url), None, store, store.version("samples"), GENERATION, work / "annotate", progress=False
    )
    return {"baseline_rss_mb": base, "written": stats["this_run"]["written"], "rows": stats.get("rows")}


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


def run_child(part: str, work: Path, base_url: str = "") -> dict:
    started = time.time()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", part, "--workdir", str(work), "--base-url", base_url],
        env=_env(),
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
    from openai_server import ChatServer

    from cycle.annotate.schema import to_target_json

    def answer(prompt, seed, body):
        alt = prompt.rsplit(": ", 1)[-1]
        return to_target_json(
            {
                "desc": [f"the image shows {alt}."],
                "neg_desc": [f"the image shows no {alt}."],
                "tags": [alt],
                "neg_tags": [f"no {alt}"],
            }
        )

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
        env=_env(),
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
    write_source(work / "source.parquet", rows)
    if part == "ingest" or not (work / "lance").exists():
        shutil.rmtree(work / "lance", ignore_errors=True)
        ingested = run_child("ingest", work)
        if part == "ingest":
            return ingested
    from cycle.store import Store

    store = Store(work / "lance")
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
    if store.count("annotations", f"generation = {GENERATION}") < rows:  # the index alone: annotate first
        prefill_annotations(store, "bench-prefill", 0)
    return run_child("index", work)


def write_results(figures: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory_scale.json").write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    lines = [
        "# Peak RSS against the table size (issue 12: memory flat in the data size)",
        "",
        "Written by `benchmarks/bench_memory_scale.py` (see its docstring for what each part runs). Each figure",
        'is one fresh process\'s peak RSS (`ru_maxrss`); "work" is the peak less the RSS after its imports.',
        f"Target: peak at the larger size <= {TARGET_RATIO}x the peak at the smaller.",
        "",
        "| part | rows | peak RSS (MB) | after imports (MB) | work (MB) | wall (s) | ratio of peaks | target met |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for part in PARTS:
        runs = figures.get(part, {})
        sizes = sorted(runs, key=int)
        for rows in sizes:
            r = runs[rows]
            ratio, met = "", ""
            if rows != sizes[0]:
                ratio_value = r["peak_rss_mb"] / runs[sizes[0]]["peak_rss_mb"]
                ratio, met = f"{ratio_value:.2f}", "yes" if ratio_value <= TARGET_RATIO else "**no**"
            work = r["peak_rss_mb"] - r["baseline_rss_mb"]
            lines.append(
                f"| {part} | {int(rows):,} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | {work:.0f} | "
                f"{r['wall_s']:.0f} | {ratio} | {met} |"
            )
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
    args = ap.parse_args()
    if args.serve:
        return serve()
    if args.child:
        started = time.time()
        if args.child == "annotate":
            result = child_annotate(args.workdir, args.base_url)
        else:
            result = {"ingest": child_ingest, "index": child_index}[args.child](args.workdir)
        result.update(peak_rss_mb=round(_peak_rss_mb(), 1), seconds=round(time.time() - started, 1))
        result["baseline_rss_mb"] = round(result["baseline_rss_mb"], 1)
        print(json.dumps(result))
        return None

    path = OUT / "memory_scale.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    for part in PARTS if args.part == "all" else (args.part,):
        for rows in args.rows:
            result = measure(part, rows, args.workdir, args.annotate_new)
            figures.setdefault(part, {})[str(rows)] = result
            print(
                f"{part} at {rows:,} rows: peak RSS {result['peak_rss_mb']:.0f} MB ({result['wall_s']:.0f} s)",
                flush=True,
            )
            write_results(figures)
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return None


if __name__ == "__main__":
    main()
