"""Atomic, resumable training checkpoints over DeepSpeed's own checkpoint format.

Layout under `<out_dir>/checkpoints/`:

    run.json              what this directory trains (fingerprint of the inputs, world size): a resume
                          into a directory of another run is refused before anything is loaded
    latest                the tag of the newest complete checkpoint (written last, atomically)
    step-00000010/        DeepSpeed files (model + ZeRO optimizer partitions, every rank's) and
                          rng-rank<r>.pt (each rank's RNG states, as tensors and plain numbers)

A checkpoint is written into `tmp-step-...` by every rank (DeepSpeed's `save_checkpoint` is collective),
then rank 0 renames it and rewrites `latest`. A kill at any moment leaves either the previous checkpoint
or the new one named in `latest`, never a half-written one; leftover `tmp-*` directories are removed.
The trainer's own state (step, sampler position: plain ints) travels in DeepSpeed's `client_state`.

Resume unpickles no objects from the run folder: every file, DeepSpeed's included, is read with
`torch.load(weights_only=True)` (tensors, plain data, and the few DeepSpeed data classes in
`_deepspeed_data_classes`); a file that holds anything else is refused with a `ResumeError`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import HQClipError
from ..files import write_json_atomic, write_text_atomic
from .dist import DistInfo, barrier

LATEST = "latest"
RUN_FILE = "run.json"


class ResumeError(HQClipError):
    """The checkpoint directory belongs to another run, or is not usable; the message says why."""


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
                    f"{mine.get(key)!r}); use another out_dir, or delete it to start over"
                )
    else:
        write_json_atomic(run_file, identity, indent=1)


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


# ----------------------------------------------------------------------------------------- save
def save(engine, root: Path, step: int, client_state: dict, info: DistInfo, keep: int = 1) -> str:
    """Write checkpoint `step-<step>` atomically on every rank; keep the newest `keep`. Returns the tag."""
    tag, tmp_tag = f"step-{step:08d}", f"tmp-step-{step:08d}"
    if info.is_main:
        shutil.rmtree(root / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), root / tmp_tag / _rng_file(info))
    barrier()  # every rank's files are in place
    if info.is_main:
        for f in (root / tmp_tag).iterdir():
            _fsync_path(f)
        shutil.rmtree(root / tag, ignore_errors=True)
        (root / tmp_tag).rename(root / tag)
        _fsync_path(root)
        write_text_atomic(root / LATEST, tag + "\n")
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != tag)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return tag


def _fsync_path(path: Path) -> None:
    """The files DeepSpeed wrote, and the renamed folder, reach the disk before `latest` names them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_file(info: DistInfo) -> str:
    return f"rng-rank{info.rank}.pt"


def _rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers (what `weights_only=True` reads back)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------- load
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
    rng_file = root / tag / _rng_file(info)
    if not rng_file.is_file():
        raise ResumeError(f"checkpoint '{root / tag}' has no {rng_file.name}: it was written by another world size")
    rng_state = load_weights_only(rng_file)  # read before anything is restored: a refused file changes nothing
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(original)
    try:
        path, client_state = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    finally:
        engine.checkpoint_engine = original
    if path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint '{root / tag}'")
    _set_rng_state(rng_state)
    return client_state


def load_weights_only(path: Path, map_location=None):
    """`torch.load` that builds tensors, plain data and `_deepspeed_data_classes` only, never other objects."""
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ResumeError(
            f"checkpoint file '{path}' holds more than tensors and plain data; refused (resume "
            f"never unpickles objects from the run folder): {str(err).splitlines()[0]}"
        ) from None


def _deepspeed_data_classes() -> list:
    """Classes DeepSpeed's ZeRO-1/2 optimizer files hold besides tensors: plain records, built side-effect free."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose `load` is `load_weights_only`; every other call goes to the wrapped one.

    DeepSpeed's `TorchCheckpointEngine.load` calls `torch.load(weights_only=False)`, and `load_checkpoint`
    reads every file (model states, ZeRO partitions) through `engine.checkpoint_engine.load`.
    """

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location)
