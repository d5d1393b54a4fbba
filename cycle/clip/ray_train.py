"""CLIP training under Ray Train (`cluster.executor: ray`): `train.world_size` workers of a `TorchTrainer`.

Each worker runs the same `trainer.train_rank` as a spawned or torchrun rank. Ray places the workers on
whichever nodes have the resources, brings torch.distributed up (gloo on CPU, NCCL on GPU) and sets
RANK / WORLD_SIZE / LOCAL_RANK, so `dist.world_info_from_env` reads them as it reads torchrun's and
DeepSpeed joins that group instead of making its own. Each worker reads only its shard of the train rows
(the job carries pinned versions, not an index).

Everything the workers write (checkpoints, `log.jsonl`, the model, Ray's own run record under
`<out_dir>/ray`) goes to `out_dir`, which must be a path every node sees (a shared filesystem). A run
killed and started again resumes from the last checkpoint there, as a local run does.
"""

from __future__ import annotations

from ..cluster import run_ray_train


def train_with_ray(job, cluster, accelerator: str) -> None:
    """Run `trainer.train_rank(job)` on `job.plan.world_size` Ray Train workers; returns when all are done.

    `cluster` is the config's `cluster` block (address, runtime_env), connected by `cluster.ray_cluster`: a
    Ray already initialised in this process (a test's, a notebook's) is used as it is. `accelerator` is "cpu" or "cuda".
    """
    config = {"job": job, "accelerator": accelerator}
    run_ray_train(_worker, config, cluster, job.plan.world_size, accelerator, job.out_dir / "ray", "train-clip")


def _worker(config: dict) -> None:
    """One Ray Train worker: the process group is Ray's; DeepSpeed and the trainer do the rest."""
    from . import dist
    from .trainer import train_rank

    dist.select_accelerator(config["accelerator"])  # before DeepSpeed is imported in this worker
    train_rank(config["job"])
