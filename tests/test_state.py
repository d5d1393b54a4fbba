"""Run state: atomic writes; the run lock refuses a second controller and takes over a stale one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from cycle.state import RunLock, RunLocked, RunState, write_json_atomic

HOLD = """
import sys, time
from cycle.state import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_atomic_write_leaves_no_temp_and_roundtrips(tmp_path):
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    write_json_atomic(tmp_path / "s.json", {"a": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_state_records_stages_and_forgets_from(tmp_path):
    st = RunState(tmp_path)
    order = ["lvlm", "annotate", "train", "eval"]
    st.mark_running(0, "train", "f0")
    assert not st.is_done(0, "train")
    st.mark_done(0, "train", "f0", outputs={"clip": "x"}, metrics={"m": 1.0})
    for stage in order:
        st.mark_running(1, stage, "f1")
        st.mark_done(1, stage, "f1")
    again = RunState(tmp_path)
    assert again.is_done(0, "train") and again.stage(0, "train")["outputs"] == {"clip": "x"}
    assert again.generations == [0, 1]
    assert again.forget_from(1, order, "train") == ["1:train", "1:eval"]
    assert RunState(tmp_path).is_done(1, "annotate") and not RunState(tmp_path).is_done(1, "train")


def test_second_controller_is_refused(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=f"in use by another controller \\(pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RunLock(tmp_path) as lock:
        assert lock.took_over_from["pid"] == proc.pid
    with RunLock(tmp_path) as lock:  # released cleanly: nothing to take over
        assert lock.took_over_from is None


def test_a_record_of_an_earlier_layout_is_refused_in_one_line(tmp_path):
    from cycle.state import StateError

    (tmp_path / "state.json").write_text('{"generations": {"0": {"data": {"status": "done"}}}}')
    with pytest.raises(StateError, match="written by an earlier hqclip .*start a new run"):
        RunState(tmp_path)
