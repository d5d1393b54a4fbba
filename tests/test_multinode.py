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
