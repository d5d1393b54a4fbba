"""The annotation pass on a Ray cluster (`cluster.executor: ray`): Ray Data's batch-inference pattern.

    lance_ray.read_lance(samples@pinned, only the unfinished shards)          read tasks, no CPU held
      -> map_batches(ShardAnnotator, actor pool)    one backend (one model) per actor, GPUs from the config
      -> this process: rows gathered per shard; a shard whose rows are all in is appended to staging
    then staging is merged into `annotations` in one commit (`shards.Staging`), here, by the controller.

A killed actor or node: Ray Data restarts the actor and retries its batch (rows it already sent are
dropped by id); a killed controller: the committed shards stay in staging and the next pass skips them.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from ..store import ANNOTATIONS, Store, dedupe
from .shards import STAGING_SCHEMA, ShardPlan, Staging, shard_ids, staging_plan

READ_COLUMNS = ["id", "image", "alt_text"]


class ShardAnnotator:
    """A Ray Data actor: builds one annotation backend (the configured one, by the backend factory) and
    turns batches of sample rows into annotation rows tagged with their shard."""

    def __init__(
        self,
        cfg: Any,
        model_dir: Optional[str],
        lora_dir: Optional[str],
        out_dir: str,
        device: str,
        generation: int,
        rows_per_shard: int,
        todo_shards: list[int],
        score_clip: Optional[str],
        torch_threads: int,
    ):
        import torch

        from .backends import make_backend

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        own_dir = Path(out_dir) / "actors" / f"{socket.gethostname()}-{os.getpid()}"  # vLLM's files, per actor
        self.backend = make_backend(cfg, model_dir, own_dir, device=device, lora_dir=lora_dir)
        self.scorer = None
        if score_clip:
            from .score import ClipScorer

            self.scorer = ClipScorer(score_clip, device=device)
        self.cfg, self.generation, self.rows_per_shard = cfg, generation, rows_per_shard
        self.todo = pa.array(sorted(todo_shards), pa.int64())

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .run import annotate_batch

        shards = shard_ids(batch.column("_rowaddr"), self.rows_per_shard)
        keep = pc.is_in(shards, value_set=self.todo)  # a whole fragment may be read: finished shards drop here
        batch, shards = batch.filter(keep), shards.filter(keep)
        if batch.num_rows == 0:
            return STAGING_SCHEMA.empty_table()
        rows = annotate_batch(
            self.backend, batch.select(READ_COLUMNS).to_pylist(), self.cfg, self.generation, self.scorer
        )
        return pa.Table.from_pylist(rows, schema=ANNOTATIONS).append_column("shard", shards)


class ShardCommitter:
    """Gathers the actors' rows per shard; appends the finished shards to staging together, at most once
    every `commit_every_s` seconds (and at the end: `flush`). One commit per shard would give a pass of
    150M rows ~150k Lance versions, each rewriting a manifest that lists every earlier fragment; a killed
    controller loses only the finished shards of its last interval."""

    def __init__(self, staging: Staging, plan: ShardPlan, on_first_rows, commit_every_s: float = 0.0):
        self.staging, self.plan, self.on_first_rows = staging, plan, on_first_rows
        self.pending: dict[int, list[pa.Table]] = {}  # unfinished shards only: bounded by what is in flight
        self.finished: list[pa.Table] = []  # finished shards not committed yet: at most one interval's
        self.commit_every_s, self.last_commit = float(commit_every_s), time.monotonic()
        self.committed, self.rows = 0, 0

    def add(self, table: pa.Table) -> int:
        """Take one output block; returns the new rows it brought (for the progress bar)."""
        if table.num_rows == 0:
            return 0
        if self.on_first_rows is not None:
            self.on_first_rows(table.column("annotator")[0].as_py())
            self.on_first_rows = None
        new = 0
        for shard in pc.unique(table.column("shard")).to_pylist():
            parts = self.pending.setdefault(shard, [])
            before = parts[0].num_rows if parts else 0
            parts.append(table.filter(pc.equal(table.column("shard"), shard)))
            rows = dedupe(pa.concat_tables(parts), ["id"])  # a retried batch may send rows again
            self.pending[shard] = [rows]
            new += rows.num_rows - before
            if rows.num_rows >= self.plan.expected[shard]:
                self.finished.append(rows)
                del self.pending[shard]
        if self.finished and time.monotonic() - self.last_commit >= self.commit_every_s:
            self.flush()
        return new

    def flush(self) -> None:
        """Commit the finished shards held back: one Lance version, or one per shard with `commit_every_s` 0."""
        if not self.finished:
            return
        per_shard = self.commit_every_s <= 0
        for rows in self.finished if per_shard else [pa.concat_tables(self.finished)]:
            self.staging.commit(rows)
            self.rows += rows.num_rows
            self.committed += 1 if per_shard else len(self.finished)
        self.finished, self.last_commit = [], time.monotonic()


def annotate_on_ray(
    cfg: Any,
    cluster: Any,
    model_dir: Optional[str | Path],
    store: Store,
    samples_version: int | str,
    generation: int,
    where: str,
    out_dir: Path,
    check_annotator,
    score_clip: Optional[str | Path] = None,
    device: str = "auto",
    lora_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> dict:
    """Annotate the rows of `samples@samples_version` matching `where` on the Ray cluster `cluster` names
    (a `ClusterConfig`) and merge them into `annotations`. `check_annotator(fingerprint, staged=())` refuses
    an annotator other than the one that began the generation (in `annotations`, or the `staged` ones).
    Returns this pass's figures (`this_run` of the stats)."""
    import lance_ray
    import ray.data

    from ..cluster import ray_cluster

    actors = cluster.annotate
    t0 = time.time()
    plan, version = staging_plan(store, samples_version, where, actors.rows_per_shard)
    staging = Staging(store, generation, actors.rows_per_shard, version)
    done = staging.done_shards() & plan.expected.keys()
    staged = staging.annotators()
    for fingerprint in staged:  # staging and annotations begun by one annotator
        check_annotator(fingerprint)
    todo = sorted(s for s in plan.expected if s not in done)
    # and this pass's annotator (known from the first rows back) is that one too
    committer = ShardCommitter(
        staging, plan, lambda fingerprint: check_annotator(fingerprint, staged), actors.commit_every_s
    )
    todo_rows = sum(plan.expected[s] for s in todo)
    if todo:
        samples = store.table("samples", version).to_lance()
        with ray_cluster(cluster):
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False  # ours counts rows; Ray's bars per operator flood a log
            ctx.print_on_execution_start = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # lance-ray passes ray_remote_args on
                reader = lance_ray.read_lance(
                    samples.uri,
                    columns=READ_COLUMNS,
                    filter=plan.row_filter(todo, where),
                    fragment_ids=plan.fragments(todo),
                    with_metadata=True,
                    storage_options=dict(store.storage_options) or None,
                    dataset_options={"version": version},
                    ray_remote_args={"num_cpus": 0},  # reading is I/O: the CPUs stay with the actors
                )
            annotated = reader.map_batches(
                ShardAnnotator,
                fn_constructor_kwargs=dict(
                    cfg=cfg,
                    model_dir=str(model_dir) if model_dir else None,
                    lora_dir=str(lora_dir) if lora_dir else None,
                    out_dir=str(out_dir),
                    device=device,
                    generation=int(generation),
                    rows_per_shard=actors.rows_per_shard,
                    todo_shards=todo,
                    score_clip=str(score_clip) if score_clip else None,
                    torch_threads=max(1, int(actors.cpus_per_actor)),
                ),
                batch_size=cfg.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors.actors),
                num_cpus=actors.cpus_per_actor,
                num_gpus=actors.gpus_per_actor or None,
            )
            bar = tqdm(total=todo_rows, desc=f"annotate gen {generation} (ray)", unit="img", disable=not progress)
            try:
                for block in annotated.iter_batches(batch_size=None, batch_format="pyarrow"):
                    bar.update(committer.add(block))
                committer.flush()
            finally:
                bar.close()
        if committer.pending:  # every planned row was read, so a shard left open is a bug, not bad luck
            left = sorted(committer.pending)[:5]
            raise RuntimeError(f"annotation on Ray ended with {len(committer.pending)} unfinished shards: {left}")
    merged = staging.merge_into_annotations(plan)
    staging.drop()
    seconds = time.time() - t0
    return {
        "executor": "ray",
        "written": merged,
        "already_done": sum(plan.expected[s] for s in done),
        "shards": {"total": len(plan.expected), "already_done": len(done), "run": committer.committed},
        "rows_per_shard": actors.rows_per_shard,
        "seconds": round(seconds, 2),
        "rows_per_s": round(committer.rows / seconds, 2) if seconds > 0 else None,
    }
