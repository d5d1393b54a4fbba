"""Training beyond one machine: the launchers' variables (torchrun, SLURM), `hqclip run` under a launcher,
a rank reading only its shard, and two "nodes" on loopback training to the spawned 2-rank run's weights."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cycle.clip.dist import LauncherError, WorldInfo, first_host, world_info_from_env

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29500"}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[007-010,12],cpu1",
    "SLURM_NODELIST": "ignored[1-2]",
}


def test_multinode_world_info_from_torchrun_env():
    assert world_info_from_env(TORCHRUN) == WorldInfo(3, 1, 4, "10.0.0.5", 29500, "torchrun")
    assert world_info_from_env({}) == WorldInfo() and not WorldInfo().launched
    # torchrun inside a SLURM allocation: torchrun's variables win
    assert world_info_from_env({**SLURM, **TORCHRUN}).launcher == "torchrun"


def test_multinode_world_info_from_slurm_env():
    info = world_info_from_env(SLURM)
    assert info == WorldInfo(5, 1, 8, "gpu007", 20000 + 123456 % 10000, "slurm")
    assert world_info_from_env({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}).master_addr == "head"
    no_job_list = {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}
    assert world_info_from_env(no_job_list).master_addr == "ignored1"
    # one task (an salloc shell, a batch script): no launcher, the cycle may spawn its own ranks
    assert not world_info_from_env({**SLURM, "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launched
    assert [first_host(n) for n in ("a", "n[3-4]", "x-1,x-2", " node[09]")] == ["a", "n3", "x-1", "node09"]


@pytest.mark.parametrize(
    "env, message",
    [
        ({**TORCHRUN, "RANK": "three"}, "RANK='three' is not an integer"),
        ({**TORCHRUN, "RANK": "4"}, "rank 4, local rank 1, world size 4"),
        ({k: v for k, v in SLURM.items() if "NODELIST" not in k}, "cannot tell the master host"),
        ({**SLURM, "SLURM_LOCALID": "-1"}, "local rank -1"),
    ],
)
def test_multinode_bad_launcher_variables_are_one_line_errors(env, message):
    with pytest.raises(LauncherError, match=message.replace("[", r"\[").replace("(", r"\(")):
        world_info_from_env(env)


@pytest.mark.parametrize("env", [TORCHRUN, SLURM])
def test_multinode_hqclip_run_under_a_launcher_is_refused(env, tmp_path, monkeypatch):
    """One controller per rank would collide on the run lock: refused before the config or the run folder."""
    from cycle.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["run", "tiny", f"root={tmp_path}"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "start the controller once" in lines[0] and "hqclip train" in lines[0]
    assert ("SLURM_NTASKS=8" if env is SLURM else "WORLD_SIZE=4") in lines[0]
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------- a rank's shard
@pytest.fixture(scope="module")
def shard_store(tmp_path_factory):
    """36 samples in 3 appends (3 fragments), every 4th one val; generation-1 annotations for even rows
    (s010 failed, s012 twice: its first usable one wins), teacher rows for s001 and s003."""
    import io

    from PIL import Image

    from cycle.store import Store

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (i * 7 % 256, 0, 0)).save(buf, "PNG")
        return buf.getvalue()

    store = Store(tmp_path_factory.mktemp("shard-store") / "lance")
    for part in range(3):
        store.append(
            "samples",
            [
                dict(id=f"s{i:03d}", image=png(i), source="t", split="val" if i % 4 == 3 else "train")
                | dict(alt_text=f"alt {i}", width=4, height=4, sha256=str(i), meta=None)
                for i in range(12 * part, 12 * part + 12)
            ],
        )

    def annotation(i: int, text: str, status: str = "ok") -> dict:
        return dict(id=f"s{i:03d}", generation=1, desc=[text], neg_desc=[], tags=[text], neg_tags=[], status=status)

    rows = [annotation(i, f"gen1 {i}", "failed" if i == 10 else "ok") for i in range(0, 36, 2)]
    store.insert_new("annotations", rows + [annotation(12, "a later one")])
    store.insert_new("teacher", [dict(id=f"s{i:03d}", desc=[f"seed {i}"], origin="teacher") for i in (1, 3)])
    return store


def test_multinode_a_rank_indexes_and_reads_only_its_shard(shard_store, monkeypatch):
    import cycle.data.loader as loader
    from cycle.data.loader import PairDataset
    from cycle.data.sampler import ResumableSampler

    args = dict(split="train", generation=1, use_teacher=True)
    whole = PairDataset(shard_store.uri, **args)
    assert len(whole) == 27
    everything = whole.__getitems__(range(27))
    monkeypatch.setattr(loader, "INDEX_CHUNK_ROWS", 5)  # chunks that cut fragments: the same rows and joins
    ranks = [ResumableSampler(27, batch_size=6, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        start, stop = sampler.owned_rows
        shard = PairDataset(shard_store.uri, **args, row_range=(start, stop))
        assert len(shard) == len(shard._rows) == len(shard._ann_rows) == stop - start == 9  # its rows only
        got = shard.__getitems__(range(len(shard)))
        assert [(g["id"], g["desc"], g["text_source"]) for g in got] == [
            (e["id"], e["desc"], e["text_source"]) for e in everything[start:stop]
        ]
        for batch in sampler:  # the sampler's local indices stay inside the rank's dataset
            assert 0 <= min(batch) and max(batch) < len(shard)
    by_id = {e["id"]: e for e in everything}
    assert by_id["s012"]["desc"] == ["gen1 12"] and by_id["s010"]["text_source"] == ""
    assert by_id["s001"]["text_source"] == "teacher" and by_id["s005"]["text_source"] == ""
    with pytest.raises(ValueError, match="which has 27"):
        PairDataset(shard_store.uri, **args, row_range=(20, 30))


def test_multinode_the_train_job_carries_pinned_versions_not_an_index(shard_store, tmp_path):
    """What a spawned rank or Ray worker receives: the store, pinned ints, no per-row data."""
    import pickle

    from cycle.cli_common import config_file
    from cycle.clip.train import prepare
    from cycle.config import load_config

    overrides = ["name=t", "clip.name=hqclip-micro", "train.batch_size=6", "train.world_size=3", "loss.stc_min_count=1"]
    cfg = load_config(config_file("tiny"), overrides)
    job = prepare(cfg, shard_store.uri, tmp_path / "clip", None, None, generation=1, progress=False)
    assert job.plan.num_samples == 27 and job.plan.shards == 3 and job.plan.steps_per_epoch == 4
    assert set(job.data) == {"store_uri", "split", "samples_version", "annotations_version", "generation"} | {
        "teacher_version",
        "prefer",
        "storage_options",
    }
    assert isinstance(job.data["samples_version"], int) and isinstance(job.data["annotations_version"], int)
    assert len(pickle.dumps(job.data)) < 1000
    # the STC vocabulary and negative shares come from the streamed pass over the 17 usable annotations
    # (18 even train rows, s010 failed; s012's later annotation unused), each 1 desc + 1 tag, no negatives
    assert len(job.tag_vocab) == 17 and "a later one" not in job.tag_vocab and "gen1 10" not in job.tag_vocab
    assert job.negative_stats["negative_parts"] == 34 and job.negative_stats["unaligned_negative_share"] == 1.0
    assert job.tag_positive_rate == pytest.approx(1 / 17) and job.tag_prior == pytest.approx([1 / 17] * 17)
