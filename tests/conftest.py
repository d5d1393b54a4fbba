"""Shared test setup: offline, CPU DeepSpeed, and small built datasets reused across a session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One torch thread, like configs/tiny.yaml: the suite's models are tiny, and with two threads their steps
# slow down 20-50x whenever another process competes for the two cores (OpenMP threads spin-wait).
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
SMALL_CYCLE = [  # the tiny config, smaller still: for whole-cycle runs beside the main one (S3, Ray)
    "data.emoji.n_train=96",
    "data.emoji.n_val=24",
    "data.emoji.n_test_retrieval=24",
    "data.emoji.n_test_negatives=24",
    "data.emoji.n_test_compositional=12",
    "lvlm.sft.epochs=2",
    "train.epochs=1",
]


@pytest.fixture(scope="session")
def tiny_cfg():
    from cycle.config import load_config

    return load_config(TINY_YAML)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_cfg):
    """The tiny emoji-scenes set built once per session into a LanceDB store (read-only for tests)."""
    from cycle.data.emoji import build_emoji_scenes
    from cycle.store import Store

    store = Store(tmp_path_factory.mktemp("tiny-store") / "lance")
    build_emoji_scenes(tiny_cfg.data.emoji, store, progress=False)
    return store


def chromium_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of a local page after its scripts ran, from headless Chromium (Debian's package)."""
    import subprocess

    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'ud'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
    ]
    return subprocess.run(["chromium", *flags, page.as_uri()], capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(scope="session")
def tokenizer():
    """open_clip's bundled CLIP BPE tokenizer (offline)."""
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def decode_tokens(tokenizer, row) -> str:
    """A token row back to text, padding and start/end tokens left out."""
    ids = [int(t) for t in row if int(t) not in (0, 49406, 49407)]
    return tokenizer.decode(ids).strip()
