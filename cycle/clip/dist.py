"""Process topology for training: one process, several on this machine, or whatever a launcher started.

- `world_info_from_env(env)`: rank, local rank, world size and rendezvous of this process as a launcher
  describes it: torchrun / the `deepspeed` launcher / Ray Train (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT) or SLURM's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
  the job's node list as the master). The one place that reads these variables.
- `launch(fn, world_size, *args, accelerator=...)`: run `fn(*args)` as `world_size` ranks. Under a
  launcher it just calls `fn` in this process (this process is one rank of a job that may span
  machines; SLURM's variables are first translated into the ones DeepSpeed reads). With one rank it
  also runs in this process, with the rendezvous variables DeepSpeed wants set for the call (without
  them it goes looking for MPI). With more it starts that many fresh interpreters (gloo on CPU).
  It is the one place that sets DS_ACCELERATOR (see `select_accelerator`).
- `DistInfo.current()`: rank, local rank and world size of this process.
- `refuse_controller_under_launcher()`: `hqclip run` is one controller, never one per rank.
- `init_process_group(device)` / `shutdown()`: DeepSpeed's comm backend up and down, idempotent.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from ..errors import HQClipError

# torch is imported inside the functions that need it: `cycle.config` reads `world_info_from_env`.

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RANK_POLL_S = 0.1  # how often the parent looks at its ranks: a failed one stops the others this soon
# SLURM gives no rendezvous port: every task must derive the same one, so it comes from the job id.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


class LauncherError(HQClipError):
    """The launcher's environment variables are malformed or contradict each other."""


@dataclass(frozen=True)
class WorldInfo:
    """This process's place in a job, as its launcher described it (`launcher` "" when none did)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = ""  # "torchrun" (torchrun, deepspeed, Ray Train, our own ranks), "slurm" or ""

    @property
    def launched(self) -> bool:
        return bool(self.launcher)


def _int_var(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise LauncherError(f"environment variable {name} is missing (the launcher sets it for every rank)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise LauncherError(f"environment variable {name}={raw!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (zero padding kept)."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if not match:
        raise LauncherError(f"SLURM node list {nodelist!r} names no host")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges.strip(), maxsplit=1)[0]


def world_info_from_env(env: Optional[Mapping[str, str]] = None) -> WorldInfo:
    """Read the launcher's variables (default: `os.environ`); torchrun's win over SLURM's (torchrun under srun).

    SLURM with one task (an `salloc` shell, a batch script) is no launcher: the cycle may spawn its own
    ranks there. MASTER_ADDR / MASTER_PORT set by the user win over the ones derived from SLURM's.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = WorldInfo(
            _int_var(env, "RANK"),
            _int_var(env, "LOCAL_RANK", 0),
            _int_var(env, "WORLD_SIZE"),
            env.get("MASTER_ADDR"),
            _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            "torchrun",
        )
    elif "SLURM_PROCID" in env and _int_var(env, "SLURM_NTASKS", 1) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and not nodelist:
            raise LauncherError("SLURM_JOB_NODELIST and SLURM_NODELIST are both unset: cannot tell the master host")
        port = _int_var(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        if port is None:
            port = SLURM_PORT_BASE + _int_var(env, "SLURM_JOB_ID", 0) % SLURM_PORT_SPAN
        info = WorldInfo(
            _int_var(env, "SLURM_PROCID"),
            _int_var(env, "SLURM_LOCALID", 0),
            _int_var(env, "SLURM_NTASKS"),
            env.get("MASTER_ADDR") or first_host(nodelist),
            port,
            "slurm",
        )
    else:
        return WorldInfo()
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise LauncherError(
            f"launcher variables out of range: rank {info.rank}, local rank {info.local_rank}, "
            f"world size {info.world_size}"
        )
    return info


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def current(cls) -> "DistInfo":
        info = world_info_from_env()
        return cls(info.rank, info.local_rank, info.world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def refuse_controller_under_launcher() -> None:
    """`hqclip run` is the run's one controller (it holds the run lock and commits every table): started
    by a launcher as N processes it would run N controllers. Say what to do instead."""
    info = world_info_from_env()
    if info.world_size > 1:
        raise LauncherError(
            f"hqclip run was started as rank {info.rank} of {info.world_size} by {info.launcher} "
            f"({'SLURM_NTASKS' if info.launcher == 'slurm' else 'WORLD_SIZE'}={info.world_size}): start the "
            f"controller once (it trains on train.world_size ranks itself); to train one CLIP across machines, "
            f"run `hqclip train` per rank under torchrun/srun (README: Running on a cluster)"
        )


def _export_rendezvous(info: WorldInfo) -> None:
    """The variables DeepSpeed's `init_distributed` reads, from what the launcher gave (SLURM gives others)."""
    os.environ.update(RANK=str(info.rank), LOCAL_RANK=str(info.local_rank), WORLD_SIZE=str(info.world_size))
    if info.master_addr is not None:
        os.environ["MASTER_ADDR"] = info.master_addr
    if info.master_port is not None:
        os.environ["MASTER_PORT"] = str(info.master_port)


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


def select_accelerator(accelerator: str) -> None:
    """DS_ACCELERATOR=cpu for a CPU run, unless the user chose one: DeepSpeed reads the variable once, at its
    first accelerator query, and without it probes for GPUs (and picks gloo only when it finds none).

    Set here, before any rank imports deepspeed; spawned ranks inherit it with the environment.
    """
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def launch(fn: Callable, world_size: int, *args, accelerator: str = "cpu") -> None:
    """Run `fn(*args)` as `world_size` ranks; `accelerator` is the ranks' device type ("cpu" or "cuda")."""
    select_accelerator(accelerator)
    info = world_info_from_env()
    if info.launched:
        _export_rendezvous(info)
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

    import torch

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

    import torch

    _die_with_parent()
    with open(payload, "rb") as fh:
        module, qualname, args, threads = pickle.load(fh)
    if threads > 0:
        torch.set_num_threads(threads)  # ranks share the machine's cores instead of oversubscribing them
    fn = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    fn(*args)


def init_process_group(device) -> bool:
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
