"""The Ray cluster behind `cluster.executor: ray`: connect, run, disconnect. Ray is imported only here
and in the Ray stages, only when a run asks for it (`executor: local` never imports it).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import HQClipError


class ClusterError(HQClipError):
    """The Ray cluster a config names cannot be reached or used."""


@contextmanager
def ray_cluster(cluster_cfg: Any) -> Iterator[Any]:
    """The `ray` module, connected to `cluster.address` (null: a Ray started on this machine, or the one
    `RAY_ADDRESS` names) with `cluster.runtime_env`. A caller that is already connected (a test, a Ray
    job, a notebook) keeps its connection: it is used as it is and left open."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = cluster_cfg.address
    try:
        ray.init(
            address=address,
            runtime_env=dict(cluster_cfg.runtime_env) or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ClusterError(
            f"config key 'cluster.address': cannot use Ray at {address or 'a local Ray'}: {first}"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


class RayTrainError(HQClipError):
    """Ray Train could not run a stage (no cluster at the address, a worker failed)."""


def run_ray_train(
    worker: Callable[[dict], None],
    config: dict,
    cluster_cfg: Any,
    workers: int,
    accelerator: str,
    storage_path: Path,
    name: str,
    resources_per_worker: Optional[dict] = None,
) -> None:
    """Run `worker(config)` on `workers` Ray Train workers of a `TorchTrainer` (gloo on CPU, NCCL on GPU: Ray
    brings the process group up and sets RANK / WORLD_SIZE / LOCAL_RANK); returns when all are done.
    Ray's run record goes under `storage_path` (a path every node sees). A worker's own one-line error
    (`HQClipError`) is raised as it is; any other failure as one `RayTrainError` line."""
    from ray.train import RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    with ray_cluster(cluster_cfg):
        trainer = TorchTrainer(
            worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=accelerator == "cuda", resources_per_worker=resources_per_worker
            ),
            torch_config=TorchConfig(backend="gloo" if accelerator == "cpu" else "nccl"),
            run_config=RunConfig(name=name, storage_path=str(Path(storage_path).resolve())),
        )
        try:
            trainer.fit()
        except TrainingFailedError as err:
            failures = getattr(err, "worker_failures", None) or {}
            for rank in sorted(failures):
                if isinstance(failures[rank], HQClipError):
                    raise failures[rank] from None
            message = str(err).splitlines()[0]
            raise RayTrainError(f"Ray Train ({name}): {message} (the workers' errors are printed above)") from None
