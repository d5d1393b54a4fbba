"""Process topology for training: one process, several on this machine, or whatever a launcher started.

- `launch(fn, world_size, *args, accelerator=...)`: run `fn(*args)` as `world_size` ranks. Under a
  launcher (torchrun, the `deepspeed` launcher: RANK/WORLD_SIZE already set) it just calls `fn` in this
  process. With one rank it also runs in this process, with the rendezvous variables DeepSpeed wants set
  for the call (without them it goes looking for MPI). With more it starts that many fresh interpreters
  (gloo on CPU). It is the one place that sets DS_ACCELERATOR (see `_select_accelerator`).
- `DistInfo.current()`: rank, local rank and world size of this process.
- `init_process_group(device)` / `shutdown()`: DeepSpeed's comm backend up and down, idempotent.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RANK_POLL_S = 0.1  # how often the parent looks at its ranks: a failed one stops the others this soon


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def current(cls) -> "DistInfo":
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_externally() -> bool:
    """True inside torchrun / the deepspeed launcher (they set the rendezvous variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _rendezvous_env(rank: int, world_size: int, port: int):
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _select_accelerator(accelerator: str) -> None:
    """DS_ACCELERATOR=cpu for a CPU run, unless the user chose one: DeepSpeed reads the variable once, at its
    first accelerator query, and without it probes for GPUs (and picks gloo only when it finds none).

    Set here, before any rank imports deepspeed; spawned ranks inherit it with the environment.
    """
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def launch(fn: Callable, world_size: int, *args, accelerator: str = "cpu") -> None:
    """Run `fn(*args)` as `world_size` ranks; `accelerator` is the ranks' device type ("cpu" or "cuda")."""
    _select_accelerator(accelerator)
    if launched_externally():
        fn(*args)
        return
    if world_size == 1:
        with _rendezvous_env(0, 1, free_port()):
            fn(*args)
        return
    _run_ranks(fn, world_size, args)


def _run_ranks(fn: Callable, world_size: int, args: tuple) -> None:
    """Start `world_size` fresh interpreters (`python -m cycle.clip.dist`), each running `fn(*args)`.

    Fresh interpreters rather than multiprocessing's spawn: the caller's main script is not re-imported,
    so a script without a `__main__` guard (or a notebook) can train on several ranks too.
    """
    import pickle
    import subprocess
    import sys
    import tempfile

    threads = 0 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hqclip-ranks-") as tmp:
        payload = os.path.join(tmp, "call.pkl")
        with open(payload, "wb") as fh:
            pickle.dump((fn.__module__, fn.__qualname__, args, threads), fh)
        procs = []
        for rank in range(world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            procs.append(subprocess.Popen([sys.executable, "-m", "cycle.clip.dist", payload], env=env))
        failed = _wait_all(procs)
    if failed:
        rank, code = failed
        raise RuntimeError(f"training rank {rank} of {world_size} exited with code {code} (its error is printed above)")


def _wait_all(procs) -> Optional[tuple[int, int]]:
    """Wait for every rank; when one fails, stop the others (they would wait for it forever)."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    p.wait()
                return bad[0]
            if all(c == 0 for c in codes):
                return None
            time.sleep(RANK_POLL_S)
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
        raise


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the process that started it dies (no orphans after a kill)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_main(payload: str) -> None:
    import importlib
    import pickle

    _die_with_parent()
    with open(payload, "rb") as fh:
        module, qualname, args, threads = pickle.load(fh)
    if threads > 0:
        torch.set_num_threads(threads)  # ranks share the machine's cores instead of oversubscribing them
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    fn(*args)


def init_process_group(device: torch.device) -> bool:
    """Bring DeepSpeed's comm backend up (gloo on CPU, the accelerator's own on GPU). True if this call did."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else None, verbose=False)
    return True


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down through DeepSpeed, which also drops the groups it cached (a later
    training in this process then starts clean)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    import sys

    _rank_main(sys.argv[1])
