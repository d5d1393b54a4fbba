"""`hqclip doctor`: a lost, truncated or emptied state.json is found, and rebuilt from the run's tables and
folders so that the run resumes with nothing redone (or from the first stage whose outputs are gone)."""

from __future__ import annotations

import shutil

import pytest
from test_controller import finished_run, tiny  # noqa: F401  (the shared finished tiny cycle)

from cycle.controller import run_cycle
from cycle.doctor import check, rebuild
from cycle.state import RunState, StateError

pytestmark = pytest.mark.slow


def copy_run(finished_run, tmp_path, name):  # noqa: F811
    shutil.copytree(finished_run.run_dir, tmp_path / name)
    return tiny(tmp_path, name)


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage"])
def test_lost_or_corrupt_state_is_rebuilt_and_the_run_resumes_with_nothing_to_do(finished_run, tmp_path, damage):  # noqa: F811
    cfg = copy_run(finished_run, tmp_path, f"run-{damage}")
    path = cfg.run_dir / "state.json"
    original = RunState(cfg.run_dir)
    if damage == "delete":
        path.unlink()
    else:
        path.write_text(path.read_text()[:200] if damage == "truncate" else "[1, 2")
    if damage != "delete":
        with pytest.raises(StateError, match=r"state\.json is corrupt .*hqclip doctor .* --repair"):
            RunState(cfg.run_dir)
    findings, healthy = check(cfg.run_dir)
    assert not healthy and "state.json" in findings[0]
    state, resume = rebuild(cfg.run_dir)
    assert resume is None
    for gen in original.generations:
        assert set(state.data["generations"][str(gen)]) == set(original.data["generations"][str(gen)])
        assert state.stage(gen, "eval")["metrics"] == original.stage(gen, "eval")["metrics"]
        assert state.outputs(gen, "train")["clip"].startswith(str(cfg.run_dir))
    assert check(cfg.run_dir) == ([], True)
    after = run_cycle(cfg, progress=False)  # nothing left to run: every stage keeps its rebuilt entry
    assert after.stage(2, "train") == state.stage(2, "train")


def test_rebuild_stops_at_the_first_stage_whose_outputs_are_gone(finished_run, tmp_path):  # noqa: F811
    cfg = copy_run(finished_run, tmp_path, "partial")
    (cfg.run_dir / "state.json").unlink()
    shutil.rmtree(cfg.run_dir / "gen-002" / "clip")
    state, resume = rebuild(cfg.run_dir)
    assert resume == "2:train"
    assert state.is_done(2, "annotate") and not state.stage(2, "train")


def test_doctor_cli_finds_and_repairs_a_truncated_record(finished_run, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from cycle.cli import main

    cfg = copy_run(finished_run, tmp_path, "cli")
    path = cfg.run_dir / "state.json"
    path.write_text(path.read_text()[:100])
    result = CliRunner().invoke(main, ["status", str(cfg.run_dir)])
    assert result.exit_code == 2 and "hqclip doctor" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["doctor", str(cfg.run_dir), "--repair"])
    assert result.exit_code == 0 and "rebuilt" in result.output, result.output
    result = CliRunner().invoke(main, ["doctor", str(cfg.run_dir)])
    assert result.exit_code == 0 and "matches" in result.output
    assert list(cfg.run_dir.glob("state.json.broken-*"))  # the damaged record is kept beside the new one


def test_empty_record_is_a_run_with_nothing_done(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    assert RunState(tmp_path).generations == []
