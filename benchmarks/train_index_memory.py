"""Is the CLIP train index flat in the data size? Peak RSS at 20,000 and at 200,000 rows.

For each size a store of tiny images (the same 4x4 PNG in every row; 9 in 10 rows `train`, 3 in 4 train
rows annotated) is written, then a fresh process measures its peak resident memory (ru_maxrss) after the
imports and after each step of a training start: the controller's `prepare` (the train rows counted, the
versions pinned, one streamed pass over the annotations for the STC vocabulary and negative shares), and
the index of rank 0 of 2 (its shard of the train rows joined with its annotations).

    python benchmarks/train_index_memory.py            # writes benchmarks/results/train_index_memory.{json,md}

Target (issue 12): peak at 200,000 rows <= 1.3x the peak at 20,000 rows.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_env import subprocess_env

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results"
SIZES = (20_000, 200_000)
WRITE_ROWS = 20_000  # rows per append

MEASURE = r"""
import json, resource, sys
from pathlib import Path

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from cycle.cli_common import config_file
from cycle.clip.train import prepare
from cycle.config import load_config
from cycle.data.loader import PairDataset
from cycle.data.sampler import ResumableSampler
import torch, deepspeed  # what a rank has loaded anyway

uri, out = sys.argv[1], Path(sys.argv[2])
report = {"imports": peak_mib()}
cfg = load_config(config_file("tiny"), ["name=mem", "clip.name=hqclip-micro", "train.batch_size=64",
                                         "train.world_size=2", "loss.stc_min_count=1"])
job = prepare(cfg, uri, out, None, None, generation=1, progress=False)
report["prepare"] = peak_mib()
sampler = ResumableSampler(job.plan.num_samples, batch_size=64, rank=0, world_size=2)
dataset = PairDataset(**job.data, row_range=sampler.owned_rows)
report["rank_index"] = peak_mib()
report["rows_indexed"] = len(dataset)
print(json.dumps(report))
"""


def tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def build_store(root: Path, rows: int) -> str:
    from cycle.store import Store

    store = Store(root / "lance")
    png = tiny_png()
    for start in range(0, rows, WRITE_ROWS):
        ids = range(start, min(start + WRITE_ROWS, rows))
        store.append(
            "samples",
            [
                dict(id=f"s{i:07d}", image=png, source="bench", split="val" if i % 10 == 9 else "train")
                | dict(alt_text=f"a picture {i}", width=4, height=4, sha256=str(i), meta=None)
                for i in ids
            ],
        )
        annotations = [
            dict(id=f"s{i:07d}", generation=1, desc=[f"a red square number {i % 97}."], neg_desc=["a blue square."])
            | dict(tags=["red square", f"tag {i % 50}"], neg_tags=["blue square", "tag x"], status="ok")
            for i in ids
            if i % 10 != 9 and i % 4 != 3
        ]
        (store.insert_new if start == 0 else store.append)("annotations", annotations)
    return store.uri


def main() -> None:
    results = {}
    env = subprocess_env(DS_ACCELERATOR="cpu")
    for rows in SIZES:
        with tempfile.TemporaryDirectory(prefix="train-index-mem-") as tmp:
            uri = build_store(Path(tmp), rows)
            proc = subprocess.run(
                [sys.executable, "-c", MEASURE, uri, str(Path(tmp) / "clip")],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[rows] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(rows, results[rows], flush=True)
    small, big = (results[n]["rank_index"] for n in SIZES)
    summary = {"rows": list(SIZES), "peak_mib": results, "ratio": big / small, "target": 1.3}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "train_index_memory.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "# Peak RSS (MiB) of a CLIP training start: `prepare` + rank 0 of 2 indexing its shard",
        "",
        "| rows | after imports | after prepare | after the rank's index | rows the rank indexed |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n in SIZES:
        r = results[n]
        lines.append(
            f"| {n:,} | {r['imports']:.0f} | {r['prepare']:.0f} | {r['rank_index']:.0f} | {r['rows_indexed']:,} |"
        )
    lines += ["", f"Ratio 200k / 20k: **{summary['ratio']:.2f}x** (target <= 1.3x)."]
    (OUT / "train_index_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
