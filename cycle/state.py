"""Run state on disk: `state.json` (written atomically) and the lock that keeps one controller per run.

The state records, per generation and stage: status, the fingerprint of the stage's inputs, timings,
outputs (paths, table versions) and metrics. A stage is "done" only once its entry is written, which
happens after its outputs are on disk, so a kill anywhere leaves either a finished stage or one to redo.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import HQClipError
from .files import read_json, write_json_atomic


def flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """Nested stats -> {"a/b/c": number}, numbers only (how stage metrics are recorded and shown)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def gen_dir(run_dir: str | Path, gen: int) -> Path:
    """`<run>/gen-002`: where generation `gen` keeps its files (the same name as its table tag)."""
    from .store import gen_tag

    return Path(run_dir) / gen_tag(gen)


def missing_outputs(run_dir: str | Path, outputs: dict) -> list[str]:
    """Recorded output paths inside the run folder that are gone (a model name or URI is not checked)."""
    run_dir = Path(run_dir).resolve()
    gone = []
    for value in outputs.values():
        if isinstance(value, str) and value:
            path = Path(value).resolve()
            if path.is_relative_to(run_dir) and not path.exists():
                gone.append(value)
    return gone


# 2: stages as `pipeline.Stage` (the run's LM its own stage, eval in its folder, the `teacher` table)
STATE_FORMAT = 2


class StateError(HQClipError):
    """`state.json` cannot be read as a run record."""


class RunState:
    """`state.json` of one run. Mutations are saved immediately and atomically."""

    def __init__(self, run_dir: str | Path, data: Optional[dict] = None):
        self.path = Path(run_dir) / "state.json"
        self.data: dict = data if data is not None else self._read()

    def _read(self) -> dict:
        fix = f"`hqclip doctor {self.path.parent} --repair` rebuilds it from the run's tables and folders"
        try:
            data = read_json(self.path, default={})
        except (ValueError, UnicodeDecodeError) as err:
            raise StateError(f"{self.path} is corrupt ({str(err).splitlines()[0]}): {fix}") from None
        if not isinstance(data, dict) or not isinstance(data.setdefault("generations", {}), dict):
            raise StateError(f"{self.path} is not a run record: {fix}")
        if data["generations"] and data.get("format") != STATE_FORMAT:
            raise StateError(
                f"{self.path} was written by an earlier hqclip (record format {data.get('format', 1)}, "
                f"this one reads {STATE_FORMAT}): its models stay usable with `hqclip eval`/`export-clip`, "
                f"but the run cannot be resumed: start a new run"
            )
        return data

    def save(self) -> None:
        self.data["format"] = STATE_FORMAT
        write_json_atomic(self.path, self.data)

    def stage(self, gen: int, stage: str) -> dict:
        return self.data["generations"].get(str(gen), {}).get(stage, {})

    def outputs(self, gen: int, stage: str) -> dict:
        """What a finished stage recorded as its outputs (paths, table versions); {} before that."""
        return self.stage(gen, stage).get("outputs", {})

    def is_done(self, gen: int, stage: str) -> bool:
        return self.stage(gen, stage).get("status") == "done"

    def mark_running(self, gen: int, stage: str, fingerprint: str, inputs: dict | None = None) -> None:
        entry = self.data["generations"].setdefault(str(gen), {}).setdefault(stage, {})
        entry.update(
            status="running",
            fingerprint=fingerprint,
            started=time.time(),
            inputs=inputs or {},
            attempts=entry.get("attempts", 0) + 1,
        )
        self.save()

    def mark_done(
        self, gen: int, stage: str, fingerprint: str, outputs: dict | None = None, metrics: dict | None = None
    ) -> None:
        entry = self.data["generations"].setdefault(str(gen), {}).setdefault(stage, {})
        now = time.time()
        entry.update(
            status="done",
            fingerprint=fingerprint,
            finished=now,
            duration_s=round(now - entry.get("started", now), 2),
            outputs=outputs or {},
            metrics=metrics or {},
        )
        self.save()

    def mark_failed(self, gen: int, stage: str, error: str) -> None:
        """The stage raised: said in the record, so `status` does not show it running. Rerun on resume."""
        entry = self.data["generations"].setdefault(str(gen), {}).setdefault(stage, {})
        entry.update(status="failed", error=error, finished=time.time())
        self.save()

    def forget_from(self, gen: int, stage_order: list[str], stage: str) -> list[str]:
        """Drop every stage entry from (gen, stage) on; returns what was dropped ('gen:stage')."""
        dropped = []
        for g in sorted(int(k) for k in self.data["generations"]):
            stages = self.data["generations"][str(g)]
            for name in sorted(stages, key=stage_order.index):
                if g > gen or (g == gen and stage_order.index(name) >= stage_order.index(stage)):
                    del stages[name]
                    dropped.append(f"{g}:{name}")
        self.save()
        return dropped

    @property
    def generations(self) -> list[int]:
        return sorted(int(k) for k in self.data["generations"])


class RunLocked(HQClipError):
    """Another live controller holds the run."""


@dataclass
class RunLock:
    """An exclusive `flock` on `<run>/.lock`, held for the controller's lifetime.

    The kernel drops the lock when its process dies, so a lock file left by a killed controller is
    stale by construction: the next controller takes it over and says so (`took_over_from`).
    """

    run_dir: Path
    took_over_from: Optional[dict] = None
    _fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        path = Path(self.run_dir) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLocked(
                    f"run {self.run_dir} is in use by another controller "
                    f"(pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})"
                ) from None
            raise
        previous = _read_holder(fd)
        if previous.get("pid"):
            self.took_over_from = previous  # left by a process that died without releasing
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
            0,
        )
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file = released cleanly
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
