"""Atomic, resumable training checkpoints over DeepSpeed's own checkpoint format.

Layout under `<out_dir>/checkpoints/`:

    run.json              what this directory trains (fingerprint of the inputs, world size): a resume
                          into a directory of another run is refused before anything is loaded
    latest                the tag of the newest complete checkpoint (written last, atomically)
    step-00000010/        DeepSpeed files (model + ZeRO optimizer partitions, every rank's) and
                          rng-rank<r>.pt (each rank's RNG states)

A checkpoint is written into `tmp-step-...` by every rank (DeepSpeed's `save_checkpoint` is collective),
then rank 0 renames it and rewrites `latest`. A kill at any moment leaves either the previous checkpoint
or the new one named in `latest`, never a half-written one; leftover `tmp-*` directories are removed.
The trainer's own state (step, sampler position) travels in DeepSpeed's `client_state`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .dist import DistInfo, barrier

LATEST = "latest"
RUN_FILE = "run.json"


class ResumeError(RuntimeError):
    """The checkpoint directory belongs to another run, or is not usable; the message says why."""


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    _fsync_path(path.parent)


def check_run(root: Path, identity: dict) -> None:
    """Record what this checkpoint directory trains, or refuse one that trains something else.

    Called once, before any rank starts. `identity` is a JSON-able dict; the first differing key is named.
    """
    root.mkdir(parents=True, exist_ok=True)
    run_file = root / RUN_FILE
    if run_file.is_file():
        try:
            recorded = json.loads(run_file.read_text())
        except json.JSONDecodeError as err:
            raise ResumeError(f"{run_file} is not valid JSON ({err}); remove the checkpoint directory") from None
        mine, theirs = _flat(identity), _flat(recorded)
        for key in sorted(set(mine) | set(theirs)):
            if key != "fingerprint" and mine.get(key) != theirs.get(key):
                raise ResumeError(
                    f"checkpoint directory '{root}' belongs to a run with another {key} ({theirs.get(key)!r}, now "
                    f"{mine.get(key)!r}); use another out_dir, or delete it to start over")
    else:
        _write_atomic(run_file, json.dumps(identity, indent=1, sort_keys=True))


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def latest_tag(root: Path) -> Optional[str]:
    path = root / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not (root / tag).is_dir():
        raise ResumeError(f"'{path}' names checkpoint '{tag}', which is missing; remove the checkpoint directory")
    return tag


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, info: DistInfo, keep: int = 1) -> str:
    """Write checkpoint `step-<step>` atomically on every rank; keep the newest `keep`. Returns the tag."""
    tag, tmp_tag = f"step-{step:08d}", f"tmp-step-{step:08d}"
    if info.is_main:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / tmp_tag / f"rng-rank{info.rank}.pt")
    barrier()  # every rank's files are in place
    if info.is_main:
        for f in (root / tmp_tag).iterdir():
            _fsync_path(f)
        shutil.rmtree(root / tag, ignore_errors=True)
        (root / tmp_tag).rename(root / tag)
        _fsync_path(root)
        _write_atomic(root / LATEST, tag + "\n")
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != tag)
        for p in old[:max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return tag


def load(engine, root: Path, info: DistInfo) -> Optional[dict]:
    """Restore the newest complete checkpoint into `engine` and this rank's RNGs; returns its client state.

    None when there is none (a fresh start). Leftover partial checkpoints are removed.
    """
    if info.is_main:
        for partial in root.glob("tmp-step-*"):
            shutil.rmtree(partial, ignore_errors=True)
    tag = latest_tag(root)
    barrier()
    if tag is None:
        return None
    rng_file = root / tag / f"rng-rank{info.rank}.pt"
    if not rng_file.is_file():
        raise ResumeError(f"checkpoint '{root / tag}' has no {rng_file.name}: it was written by another world size")
    path, client_state = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint '{root / tag}'")
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
