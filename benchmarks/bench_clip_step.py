"""CLIP training cost on this machine: the HQ-CLIP loss against a plain CLIP step, our trainer against
open_clip's own training loop.

    python benchmarks/bench_clip_step.py [--model hqclip-tiny] [--batch 128] [--steps 8] [--samples 1024]
                                         [--threads 1] [--parts step,loop]

1. One optimisation step (forward, loss, backward, AdamW) on the same model and batch, plain torch:
   open_clip's `CLIP` + `ClipLoss`, against `ClipWithTagHead` + `HQClipLoss` with HNI (batch and pair)
   and STC (1000 tags), with and without cutting text padding (length buckets). A share of the samples
   (`--neg-share`) has a usable negative, as in a generation where some annotations are missing or their
   negative equals the positive. Median of `--steps` steps
   after two warm-up steps, the modes interleaved so machine load hits them alike.
2. Whole-loop throughput on emoji scenes from a LanceDB store (`--samples` training images): open_clip's
   `open_clip_train.train.train_one_epoch` (accum_freq 1, fp32) over the same `PairDataset`, against
   `train_clip` generation 0 (the same work: alt-text only) and generation 1 (HNI + STC, every image
   annotated). Steady-state samples/s: the first step (warm-up) is left out on both sides.
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "red green blue small big apple dog cup bus cat car tree house ball shoe hat left right top bottom "
    "two three one next to near under above"
).split()


def _texts(rng, n, lo, hi):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


# ------------------------------------------------------------------------------------------ 1. one step
def bench_step(model_name: str, batch: int, steps: int, neg_share: float, num_tags: int) -> list[tuple]:
    import numpy as np
    import torch
    from open_clip.loss import ClipLoss

    from cycle.clip.loss import HQClipLoss
    from cycle.clip.model import ClipWithTagHead, create_clip
    from cycle.clip.optim import make_optimizer
    from cycle.config import LossConfig, TrainConfig

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    _, _, _, tokenizer = create_clip(model_name)
    size = create_size(model_name)
    images = torch.randn(batch, 3, size, size)
    # As in a generation: half the positives alt-text, half long descriptions filling the context;
    # half the negatives tag lists, half long negative descriptions.
    texts = tokenizer(_texts(rng, batch // 2, 4, 16) + _texts(rng, batch - batch // 2, 60, 75))
    neg_texts = tokenizer(_texts(rng, batch // 2, 12, 24) + _texts(rng, batch - batch // 2, 60, 75))
    neg_valid = torch.from_numpy(rng.random(batch) < neg_share)
    tag_targets = torch.zeros(batch, num_tags)
    for i in range(batch):
        tag_targets[i, rng.choice(num_tags, 7, replace=False)] = 1

    def plain():
        model = create_clip(model_name)[0]
        opt = make_optimizer(model, TrainConfig())
        loss_fn = ClipLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            img, txt, scale = model(images, texts)[:3]
            loss_fn(img, txt, scale).backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)

        return step

    def ours(hni_mode: str, hni: float, stc: float, cut: bool = True):
        torch.manual_seed(0)
        module = ClipWithTagHead(create_clip(model_name)[0], num_tags=num_tags if stc else 0, cut_text_padding=cut)
        opt = make_optimizer(module, TrainConfig())
        loss_fn = HQClipLoss(replace(LossConfig(), hni_mode=hni_mode, hni_weight=hni, stc_weight=stc))
        inputs = {"images": images, "texts": texts}
        if hni:
            inputs.update(
                neg_texts=neg_texts,
                neg_valid=neg_valid,
                text_keys=torch.arange(batch),
                neg_keys=torch.arange(batch) + batch,
            )
        if stc:
            inputs["tag_targets"] = tag_targets

        def step():
            opt.zero_grad(set_to_none=True)
            out = module(**inputs)
            loss_inputs = {k: v for k, v in inputs.items() if k not in ("images", "texts", "neg_texts")}
            sum(loss_fn(**out, **loss_inputs).values()).backward()
            opt.step()
            with torch.no_grad():
                module.clip.logit_scale.clamp_(0, 4.6052)

        return step

    all_usable = "HQ-CLIP, HNI batch + STC, all negatives usable"
    modes = {
        "open_clip CLIP + ClipLoss": plain(),
        "HQ-CLIP, clip term only": ours("batch", 0.0, 0.0),
        "HQ-CLIP, HNI batch + STC": ours("batch", 1.0, 1.0),
        "HQ-CLIP, HNI pair + STC": ours("pair", 1.0, 1.0),
        all_usable: ours("batch", 1.0, 1.0),
        "HQ-CLIP, HNI batch + STC, full 77-token context (no length buckets)": ours("batch", 1.0, 1.0, cut=False),
    }
    drawn = neg_valid.clone()
    times = {k: [] for k in modes}
    for rep in range(2 + steps):  # two warm-up rounds, then timed rounds; modes interleaved
        for name, step in modes.items():
            neg_valid.copy_(torch.ones_like(drawn) if name == all_usable else drawn)  # the inputs hold this tensor
            t = time.perf_counter()
            step()
            if rep >= 2:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["open_clip CLIP + ClipLoss"])
    return [(k, statistics.median(v) * 1000, statistics.median(v) / base) for k, v in times.items()]


# ------------------------------------------------------------------------------------------ 2. loops
def build_store(root: Path, samples: int, size: int):
    from cycle.config import EmojiScenesConfig
    from cycle.data.emoji import build_emoji_scenes
    from cycle.store import Store

    cfg = EmojiScenesConfig(
        image_size=size,
        n_train=samples,
        n_val=10,
        n_test_retrieval=10,
        n_test_negatives=10,
        n_test_compositional=10,
        vocab_size=60,
        seed_share=1.0,
    )
    store = Store(root / "lance")
    build_emoji_scenes(cfg, store, progress=False)
    # Every training image "annotated" by generation 1: the teacher seeds, copied.
    rows = store.read("teacher").to_pylist()
    store.insert_new(
        "annotations",
        [
            {
                **{k: r[k] for k in ("id", "desc", "neg_desc", "tags", "neg_tags")},
                "generation": 1,
                "status": "ok",
                "attempts": 1,
            }
            for r in rows
        ],
    )
    return store


def bench_open_clip_train(store, model_name: str, batch: int, epochs: int) -> float:
    import torch
    from open_clip.loss import ClipLoss
    from open_clip_train.train import train_one_epoch
    from torch.utils.data import DataLoader

    from cycle.clip.model import create_clip
    from cycle.clip.optim import make_optimizer
    from cycle.config import TrainConfig
    from cycle.data.loader import PairDataset

    torch.manual_seed(0)
    model, preprocess_train, _, tokenizer = create_clip(model_name)
    model.output_dict = True  # what open_clip_train's main sets
    dataset = PairDataset(store.uri, "train", transform=preprocess_train)

    def collate(items):
        return torch.stack([it["image"] for it in items]), tokenizer([it["alt_text"] for it in items])

    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, collate_fn=collate)
    loader.num_batches, loader.num_samples = len(loader), len(loader) * batch
    stamps = []
    opt = make_optimizer(model, TrainConfig())

    def scheduler(step):  # called at the top of every step: our clock
        stamps.append(time.perf_counter())

    args = Namespace(
        device="cpu",
        precision="fp32",
        distill=False,
        accum_freq=1,
        skip_scheduler=False,
        grad_clip_norm=1.0,
        horovod=False,
        log_every_n_steps=10**9,
        batch_size=batch,
        world_size=1,
        rank=0,
        local_rank=0,
        wandb=False,
    )
    # open_clip_train.data.DataInfo is this, but its module imports pandas (not installed here).
    data = {"train": Namespace(dataloader=loader, set_epoch=lambda epoch: None)}
    for epoch in range(epochs):
        train_one_epoch(model, data, ClipLoss(), epoch, opt, None, scheduler, None, args)
    stamps.append(time.perf_counter())
    return (len(stamps) - 2) * batch / (stamps[-1] - stamps[1])


def bench_train_clip(store, model_name: str, batch: int, epochs: int, generation: int, out: Path) -> float:
    from cycle.clip.train import train_clip
    from cycle.config import load_config

    cfg = load_config(
        None,
        [
            "name=bench",
            f"clip.name={model_name}",
            f"train.batch_size={batch}",
            f"train.epochs={epochs}",
            "train.log_every=1",
            "train.checkpoint_every=1000000",
            "train.warmup_steps=1",
        ],
    )
    train_clip(
        cfg,
        store.uri,
        out,
        store.table("samples").version,
        annotations_version=store.table("annotations").version if generation else None,
        generation=generation or None,
        progress=False,
    )
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "event" not in r][1:]  # the first step is warm-up
    return len(steps) * batch / sum(batch / r["samples_per_s"] for r in steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hqclip-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--neg-share", type=float, default=0.75)
    ap.add_argument("--tags", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="step,loop", help="step, loop or both")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, model {args.model}, batch {args.batch}\n")
    if "step" in args.parts:
        print_step(args)
    if "loop" in args.parts:
        print_loop(args)


def print_step(args):
    rows = bench_step(args.model, args.batch, args.steps, args.neg_share, args.tags)
    print(
        f"### One step (forward + loss + backward + AdamW), {args.neg_share:.0%} usable negatives, {args.tags} tags\n"
    )
    print("| step | ms / step (median) | vs open_clip |\n|---|---:|---:|")
    for name, ms, ratio in rows:
        print(f"| {name} | {ms:.1f} | {ratio:.2f}x |")


def print_loop(args):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = create_size(args.model)
        store = build_store(tmp, args.samples, size)
        results = [
            (
                "open_clip_train `train_one_epoch` (CLIP loss, alt-text)",
                bench_open_clip_train(store, args.model, args.batch, args.epochs),
            ),
            (
                "`train_clip` generation 0 (CLIP loss, alt-text, DeepSpeed ZeRO-1)",
                bench_train_clip(store, args.model, args.batch, args.epochs, 0, tmp / "g0"),
            ),
            (
                "`train_clip` generation 1 (HQ-CLIP loss: HNI + STC)",
                bench_train_clip(store, args.model, args.batch, args.epochs, 1, tmp / "g1"),
            ),
        ]
    print(
        f"\n### Training loop, {args.samples} emoji scenes at {size} px from LanceDB, {args.epochs} epochs, "
        f"no loader workers\n"
    )
    print("| loop | samples/s (steady) | vs open_clip_train |\n|---|---:|---:|")
    for name, rate in results:
        print(f"| {name} | {rate:.0f} | {rate / results[0][1]:.2f}x |")


def create_size(model_name: str) -> int:
    from cycle.clip.model import create_clip

    size = create_clip(model_name)[0].visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else size


if __name__ == "__main__":
    main()
