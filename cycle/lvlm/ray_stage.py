"""Alignment and SFT where the run's executor says: here, or under Ray Train (`cluster.executor: ray`).

On Ray, `cluster.lvlm.workers` data-parallel workers each load the LLaVA, build the same global batches
and train on their rows of each (`common.train_loop`: token-weighted gradients summed over the workers,
so the update is one process's on the whole batch); rank 0 writes the stage's output folder. That folder
and the LLaVA it starts from must be on a path every node sees; each worker reopens the store from its
URI and storage options. Ray's run record goes to `gen-NNN/lvlm/ray/`, beside the stages' folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..device import resolve_device
from .align import align_outputs, align_projector
from .finetune import sft, sft_outputs

STAGES = {"align": (align_projector, align_outputs), "sft": (sft, sft_outputs)}


def run_lvlm_stage(name: str, cfg: Any, store: Any, **kwargs: Any) -> tuple:
    """`align_projector` or `sft` (`name`) with `cfg`, `store` and `kwargs` (their other arguments, by name),
    in this process or on Ray by `cfg.cluster.executor`; returns what the stage function returns."""
    run, outputs = STAGES[name]
    if cfg.cluster.executor != "ray":
        return run(cfg=cfg, store=store, **kwargs)
    from ..cluster import run_ray_train

    workers = cfg.cluster.lvlm
    accelerator = "cuda" if workers.gpus_per_worker > 0 else resolve_device(cfg.device).type
    resources = {"CPU": workers.cpus_per_worker}
    if accelerator == "cuda":
        resources["GPU"] = workers.gpus_per_worker or 1
    out_dir = Path(kwargs["out_dir"])
    config = {
        "stage": name,
        "cfg": cfg,
        "store": (store.uri, store.storage_options),  # credentials travel by variable name, not value
        "threads": max(1, int(workers.cpus_per_worker)),
        "kwargs": {**kwargs, "progress": False},  # workers' bars interleave in Ray's log; rank 0 logs steps
    }
    run_ray_train(
        _worker, config, cfg.cluster, workers.workers, accelerator, out_dir.parent / "ray", f"lvlm-{name}", resources
    )
    return outputs(out_dir)


def _worker(config: dict) -> None:
    """One Ray Train worker: the stage function in Ray's process group (rank 0 writes its outputs)."""
    import torch

    from ..store import Store

    torch.set_num_threads(config["threads"])
    uri, options = config["store"]
    run, _ = STAGES[config["stage"]]
    run(cfg=config["cfg"], store=Store(uri, options), **config["kwargs"])
