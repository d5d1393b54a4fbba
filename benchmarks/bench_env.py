"""The environment a benchmark gives the `cycle` processes it starts: this checkout's code, offline, one thread."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict:
    """os.environ plus PYTHONPATH=<this checkout>, the hub offline, one OpenMP thread (the benchmark decides the
    parallelism), DeepSpeed on the CPU unless the caller's environment names an accelerator; `extra` last."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(extra)
    return env
