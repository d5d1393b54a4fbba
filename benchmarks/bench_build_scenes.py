"""Time to build the emoji-scenes dataset (default `EmojiScenesConfig`: the demo size) into a fresh store.

    python benchmarks/bench_build_scenes.py [--image-size 64] [--repeat 1]

Prints a markdown table: rows, seconds for the plan (text only), the whole build (plan + glyphs +
render + PNG + LanceDB writes), rows/s, and the store's size on disk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from cycle.config import EmojiScenesConfig
from cycle.data.emoji.build import build_emoji_scenes
from cycle.data.emoji.plan import plan_emoji_scenes
from cycle.store import Store


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    cfg = replace(EmojiScenesConfig(), image_size=args.image_size)
    print("| image px | rows | plan s | build s | rows/s | store MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for _ in range(args.repeat):
        start = time.perf_counter()
        plan = plan_emoji_scenes(cfg)
        plan_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "lance")
            start = time.perf_counter()
            counts = build_emoji_scenes(cfg, store, progress=False)
            build_s = time.perf_counter() - start
            rows = sum(counts.values())
            assert rows == len(plan.rows) == store.count("samples")
            size = dir_size(Path(tmp)) / 2**20
        print(f"| {cfg.image_size} | {rows} | {plan_s:.2f} | {build_s:.2f} | {rows / build_s:.0f} | {size:.1f} |")
    print()
    print("rows per split: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
