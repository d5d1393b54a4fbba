"""The run's LanceDB store on S3: a moto S3 server on loopback stands in for the bucket (it speaks the real
S3 protocol over a real socket). The store round trip, the tiny cycle (DeepSpeed training reading the
store over S3), SIGKILL and resume, and the read-only commands, all with credentials from the environment."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import boto3
import pytest
from click.testing import CliRunner
from conftest import SMALL_CYCLE, TINY_YAML
from moto.server import ThreadedMotoServer
from PIL import Image

from cycle.cli import main
from cycle.clip.dist import free_port
from cycle.config import ConfigError, load_config
from cycle.controller import run_cycle
from cycle.data.loader import PairDataset, make_loader
from cycle.pipeline import stages_of, store_of
from cycle.state import RunState, gen_dir
from cycle.store import StorageOptions, Store, StoreError, gen_tag

# Credentials travel in these variables only (named by store.storage_options_env); the secret's value is
# checked to appear nowhere in the run folder or in a pickled dataset.
KEY_ENV, SECRET_ENV = "HQCLIP_TEST_S3_KEY_ID", "HQCLIP_TEST_S3_SECRET"
SECRET = "s3-test-secret-7f3a"
ENV = {KEY_ENV: "testing", SECRET_ENV: SECRET}
# A smaller tiny cycle: fewer images and SFT epochs (what is tested here is the store, not the annotator)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 and the credentials in the environment; yields a bucket maker."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per S3 request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, value)

        def bucket(name: str) -> str:
            client.create_bucket(Bucket=name)
            return name

        bucket.endpoint, bucket.client = endpoint, client
        yield bucket
    server.stop()


def overrides(s3, uri: str) -> list[str]:
    """The store keys of a run on the moto bucket: plain options in config, credentials by variable name."""
    return [
        f"store.uri={uri}",
        f"store.storage_options.aws_endpoint={s3.endpoint}",
        "store.storage_options.aws_region=us-east-1",
        "store.storage_options.allow_http=true",
        f"store.storage_options_env.aws_access_key_id={KEY_ENV}",
        f"store.storage_options_env.aws_secret_access_key={SECRET_ENV}",
    ]


def options(s3) -> StorageOptions:
    return StorageOptions(
        {"aws_endpoint": s3.endpoint, "aws_region": "us-east-1", "allow_http": True},
        {"aws_access_key_id": KEY_ENV, "aws_secret_access_key": SECRET_ENV},
    )


def keys(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def annotation(i: int, generation: int = 1) -> dict:
    return {"id": f"img-{i:03d}", "generation": generation, "desc": [f"a cat {i}"], "tags": ["cat"], "status": "ok"}


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), ((40 * i) % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- the store
def test_s3_store_round_trip_tags_compaction_and_no_local_folder(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path-minded Store would make a folder "s3:" here
    bucket = s3("hqclip-s3-store")
    store = Store("s3://hqclip-s3-store/runs/a/lance", options(s3))

    assert store.insert_new("annotations", [annotation(i) for i in range(10)]) == 10
    versions = store.versions("annotations")
    assert store.insert_new("annotations", [annotation(i) for i in range(10)]) == 0  # idempotent
    assert store.versions("annotations") == versions  # and no empty commit
    assert store.tag("annotations", gen_tag(1)) == versions[-1]
    assert store.insert_new("annotations", [annotation(i) for i in range(5, 15)]) == 5

    reopened = Store("s3://hqclip-s3-store/runs/a/lance", options(s3))  # a fresh connection (another process)
    assert reopened.count("annotations") == 15
    assert reopened.count("annotations", version=gen_tag(1)) == 10  # checkout by tag
    assert reopened.ids("annotations", version=gen_tag(1)) == {f"img-{i:03d}" for i in range(10)}

    reopened.compact()
    ds = reopened.table("annotations").to_lance()
    assert len(ds.get_fragments()) == 1  # two appends compacted into one fragment
    assert reopened.count("annotations", version=gen_tag(1)) == 10  # the tagged version survives cleanup
    assert reopened.tags("annotations") == {gen_tag(1): versions[-1]}

    stored = keys(s3, bucket, "runs/a/lance/annotations.lance/")
    assert any("/_versions/" in k for k in stored) and any(k.endswith(".lance") for k in stored)
    assert list(tmp_path.iterdir()) == []  # nothing local: no "s3:" folder, no store


def test_s3_pair_dataset_in_spawn_workers_and_no_secret_in_pickles(s3):
    s3("hqclip-s3-loader")
    uri = "s3://hqclip-s3-loader/lance"
    store = Store(uri, options(s3))
    rows = [{"id": f"s{i:02d}", "image": png(i), "alt_text": f"picture {i}", "split": "train"} for i in range(8)]
    store.append("samples", rows)
    dataset = PairDataset(uri, "train", storage_options=store.storage_options)
    blob = pickle.dumps(dataset)
    assert SECRET.encode() not in blob and SECRET_ENV.encode() in blob  # the variable's name, not its value
    assert pickle.loads(blob).storage_options == store.storage_options  # read again from the environment

    loader = make_loader(dataset, batch_size=4, num_workers=1)  # a spawned worker opens S3 itself
    batches = list(loader)
    assert sorted(i for b in batches for i in b["id"]) == [f"s{i:02d}" for i in range(8)]
    assert batches[0]["image"].shape == (4, 3, 16, 16)


def test_s3_missing_credentials_variable_names_it(s3, monkeypatch):
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(StoreError, match=f"store.storage_options_env.aws_secret_access_key.*{SECRET_ENV}"):
        options(s3)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["store.storage_options.aws_secret_access_key=abc"], "storage_options.aws_secret_access_key': a secret"),
        (["store.storage_options.aws_session_token=abc"], "storage_options.aws_session_token': a secret"),
        (["store.storage_options.aws_region=${oc.env:HOME}"], "an interpolation"),
        (["store.storage_options_env.aws_access_key_id=${oc.env:HOME}"], "not an interpolation"),
        (["store.storage_options_env.aws_access_key_id=not a name"], "name of an environment variable"),
        (["store.uri=s3://"], "expected s3://BUCKET/PATH"),
    ],
)
def test_s3_config_keeps_secrets_out_of_config_yaml(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_YAML, extra)


# ------------------------------------------------------------------------------------------- the cycle
@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    """The tiny cycle (generation 0 + 1) with its store on S3, run in this process: DeepSpeed trains in a
    rank that reads the store through PairDataset over S3."""
    s3("hqclip-s3-cycle")
    root = tmp_path_factory.mktemp("s3-runs")
    cfg = load_config(
        TINY_YAML,
        [
            f"root={root}",
            "name=cycle",
            "cycle.generations=1",
            *SMALL_CYCLE,
            *overrides(s3, "s3://hqclip-s3-cycle/cycle"),
        ],
    )
    run_cycle(cfg, progress=False)
    return cfg


@pytest.mark.slow
def test_s3_tiny_cycle_completes_with_the_store_in_the_bucket(s3, s3_run):
    state = RunState(s3_run.run_dir)
    for gen in (0, 1):
        for stage in stages_of(gen):
            assert state.stage(gen, stage)["status"] == "done", (gen, stage)
        metrics = state.stage(gen, "eval")["metrics"]
        assert metrics and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    store = store_of(s3_run)
    assert store.uri == "s3://hqclip-s3-cycle/cycle"
    n_train = store.count("samples", "split = 'train'", version=gen_tag(0))
    ids = store.read("annotations", ["id"], "generation = 1", version=gen_tag(1)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == n_train == 96  # every training image annotated once, on S3
    tables = {k.split("/")[1] for k in keys(s3, "hqclip-s3-cycle", "cycle/")}
    assert {"samples.lance", "teacher.lance", "annotations.lance"} <= tables
    assert not (s3_run.run_dir / "lance").exists()  # the run folder holds no store of its own
    assert (gen_dir(s3_run.run_dir, 1) / "clip" / "model").is_dir()  # models stay in the (local) run folder
    saved = (s3_run.run_dir / "config.yaml").read_text()
    assert SECRET_ENV in saved and SECRET not in saved  # the variable's name is saved, never its value


@pytest.mark.slow
def test_s3_status_inspect_report_read_the_run(s3_run, tmp_path):
    runner, run_dir = CliRunner(), str(s3_run.run_dir)
    res = runner.invoke(main, ["status", run_dir])
    assert res.exit_code == 0 and "annotate" in res.output and "done" in res.output, res.output
    res = runner.invoke(
        main, ["inspect", run_dir, "--sample", "2", "--where", "split = 'train'", "--image-out", str(tmp_path / "img")]
    )
    assert res.exit_code == 0, res.output
    assert "gen-1" in res.output and "alt-text" in res.output  # the annotations, read from S3
    assert len(list((tmp_path / "img").iterdir())) == 2  # the images too
    res = runner.invoke(main, ["report", run_dir, "--gallery", "2"])
    assert res.exit_code == 0, res.output
    page = (s3_run.run_dir / "report" / "index.html").read_text()
    assert "Gallery (2 training images)" in page and "<b>gen-1</b>" in page  # samples and annotations from S3
    assert len(list((s3_run.run_dir / "report" / "img").glob("*.png"))) == 2
    res = runner.invoke(main, ["data", "list", run_dir])
    assert res.exit_code == 0 and "s3://hqclip-s3-cycle/cycle" in res.output and "annotations" in res.output


@pytest.mark.slow
def test_s3_killed_in_training_then_resumed_completes(s3, tmp_path):
    """SIGKILL the `hqclip run` process while two spawned DeepSpeed ranks train from the S3 store (they got
    the storage options pickled with the dataset, credentials by variable name); the same command then
    finishes the run."""
    s3("hqclip-s3-killed")
    run_dir = tmp_path / "killed"
    args = ["cycle.generations=0", "train.world_size=2", "train.epochs=4", *SMALL_CYCLE[:5]]
    args += overrides(s3, "s3://hqclip-s3-killed/run")
    cmd = [sys.executable, "-m", "cycle.cli", "run", str(TINY_YAML), f"root={tmp_path}", "name=killed", *args]
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    log = gen_dir(run_dir, 0) / "clip" / "log.jsonl"

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (log.is_file() and '"loss"' in log.read_text()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # until rank 0 has logged a step: both ranks have read batches from S3
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = RunState(run_dir)
    assert state.is_done(0, "data") and state.stage(0, "train")["status"] == "running"  # killed inside train

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = RunState(run_dir)
    assert all(state.is_done(0, s) for s in stages_of(0))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]  # 4 epochs x 3 steps, once each
    store = Store.from_config(load_config(run_dir / "config.yaml"), run_dir)
    assert store.uri == "s3://hqclip-s3-killed/run"
    ids = store.read("samples", ["id"], version=gen_tag(0)).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == state.stage(0, "data")["metrics"]["rows"]  # each row once, on S3
