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

from ..errors import HQClipError


class RayTrainError(HQClipError):
    """Ray Train could not run the training (no cluster at the address, a worker failed)."""


def train_with_ray(job, cluster, accelerator: str) -> None:
    """Run `trainer.train_rank(job)` on `job.plan.world_size` Ray Train workers; returns when all are done.

    `cluster` is the config's `cluster` block (address, runtime_env), connected by `cluster.ray_cluster`: a
    Ray already initialised in this process (a test's, a notebook's) is used as it is. `accelerator` is "cpu" or "cuda".
    """
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..cluster import ray_cluster

    with ray_cluster(cluster):
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"job": job, "accelerator": accelerator},
            scaling_config=ScalingConfig(num_workers=job.plan.world_size, use_gpu=accelerator == "cuda"),
            torch_config=TorchConfig(backend="gloo" if accelerator == "cpu" else "nccl"),
            run_config=RunConfig(name="train-clip", storage_path=str((job.out_dir / "ray").resolve())),
        )
        try:
            trainer.fit()
        except TrainingFailedError as err:
            failures = getattr(err, "worker_failures", None) or {}
            for rank in sorted(failures):
                if isinstance(failures[rank], HQClipError):  # the worker's own one-line error
                    raise failures[rank] from None
            message = str(err).splitlines()[0]
            raise RayTrainError(f"Ray Train: {message} (the workers' errors are printed above)") from None


def _worker(config: dict) -> None:
    """One Ray Train worker: the process group is Ray's; DeepSpeed and the trainer do the rest."""
    from . import dist
    from .trainer import train_rank

    dist.select_accelerator(config["accelerator"])  # before DeepSpeed is imported in this worker
    train_rank(config["job"])
