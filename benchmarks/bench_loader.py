"""Decoded samples/s: the run's Lance store (PairDataset) against the same images in webdataset shards.

    python benchmarks/bench_loader.py [--n 5000] [--size 64] [--workers 0 2] [--batch 64]

Builds `--n` emoji-scene training images (the built-in builder) into a temporary store, writes the same
rows as tar shards, then reads both end to end: fetch, PNG decode, RGB tensor, collate. Each setting runs
two epochs with persistent workers: epoch 1 includes starting the (spawn) workers, epoch 2 is the steady
rate. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def build(n: int, size: int, root: Path):
    from cycle.config import EmojiScenesConfig
    from cycle.data.emoji import build_emoji_scenes
    from cycle.store import Store

    cfg = EmojiScenesConfig(
        image_size=size,
        n_train=n,
        n_val=10,
        n_test_retrieval=10,
        n_test_negatives=10,
        n_test_compositional=10,
        vocab_size=60,
    )
    store = Store(root / "lance")
    started = time.perf_counter()
    build_emoji_scenes(cfg, store, progress=True)
    train = store.count("samples", "split = 'train'")
    print(f"built {train} train images in {time.perf_counter() - started:.0f} s")
    return store


def write_shards(store, root: Path, per_shard: int = 1000) -> list[str]:
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    pattern = str(root / "shard-%05d.tar")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for batch in store.scan("samples", ["id", "image", "alt_text"], where="split = 'train'"):
            for row in batch.to_pylist():
                sink.write({"__key__": row["id"], "png": row["image"], "txt": row["alt_text"]})
    return sorted(str(p) for p in root.glob("shard-*.tar"))


def _identity(x):
    return x


def _wds_pair(sample):
    from cycle.data.loader import image_to_tensor

    image, text = sample
    return {"image": image_to_tensor(image), "alt_text": text}


def lance_loader(store, batch: int, workers: int, shuffle: bool):
    from cycle.data.loader import PairDataset, ResumableSampler, make_loader

    ds = PairDataset(store.uri, split="train")
    sampler = ResumableSampler(len(ds), seed=0, drop_last=False, batch_size=batch, shuffle=shuffle)
    return make_loader(ds, sampler=sampler, num_workers=workers), sampler


def wds_loader(shards: list[str], batch: int, workers: int):
    import webdataset as wds
    from torch.utils.data import DataLoader

    from cycle.data.loader import collate_pairs

    pipeline = (
        wds.WebDataset(shards, shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("png", "txt")
        .map(_wds_pair)
        .batched(batch, collation_fn=collate_pairs, partial=True)
    )
    extra = {"multiprocessing_context": "spawn", "persistent_workers": True} if workers else {}
    return DataLoader(pipeline, batch_size=None, num_workers=workers, **extra)


def timed_epochs(loader, sampler=None, epochs: int = 2) -> list[tuple[int, float]]:
    out = []
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        started, count = time.perf_counter(), 0
        for batch in loader:
            count += batch["image"].shape[0]
        out.append((count, time.perf_counter() - started))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        store = build(args.n, args.size, Path(tmp))
        shards = write_shards(store, Path(tmp) / "shards")
        rows = []
        for workers in args.workers:
            for shuffle in (False, True):
                loader, sampler = lance_loader(store, args.batch, workers, shuffle)
                rows.append(
                    (
                        "Lance (PairDataset)",
                        workers,
                        "shuffled" if shuffle else "sequential",
                        timed_epochs(loader, sampler),
                    )
                )
                del loader
            rows.append(
                ("webdataset tar", workers, "sequential", timed_epochs(wds_loader(shards, args.batch, workers)))
            )
        load = os.getloadavg()[0]
        print(
            f"\n{args.n} images at {args.size} px, batch {args.batch}, {os.cpu_count()} cores "
            f"(load average {load:.1f}); samples/s\n"
        )
        print("| reader | workers | order | epoch 1 (incl. worker start) | epoch 2 (steady) |")
        print("|---|---:|---|---:|---:|")
        for name, workers, order, epochs in rows:
            rates = [f"{n / s:,.0f}" for n, s in epochs]
            print(f"| {name} | {workers} | {order} | {rates[0]} | {rates[1]} |")


if __name__ == "__main__":
    main()
