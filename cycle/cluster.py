"""The Ray cluster behind `cluster.executor: ray`: connect, run, disconnect. Ray is imported only here
and in the Ray stages, only when a run asks for it (`executor: local` never imports it).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

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
