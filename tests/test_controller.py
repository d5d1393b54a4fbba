"""The cycle end to end on the tiny config: stages, resume after SIGKILL anywhere, refusals, inspection."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_YAML, chromium_dom

from cycle.cli import main
from cycle.config import ConfigError, load_config
from cycle.controller import ConfigChanged, run_cycle
from cycle.errors import HQClipError
from cycle.pipeline import stages_of, store_of
from cycle.state import RunLocked, RunState

pytestmark = pytest.mark.slow


def tiny(root: Path, name: str, *extra: str):
    return load_config(TINY_YAML, [f"root={root}", f"name={name}", *extra])


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One uninterrupted tiny cycle (generation 0 + 2), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny(root, "ref")
    run_cycle(cfg, progress=False)
    return cfg


def final_metrics(run_dir: Path) -> dict:
    state = RunState(run_dir)
    return state.stage(max(state.generations), "eval")["metrics"]


def test_every_stage_done_with_outputs_and_finite_metrics(finished_run):
    state = RunState(finished_run.run_dir)
    assert state.generations == [0, 1, 2]
    for gen in state.generations:
        for stage in stages_of(gen):
            entry = state.stage(gen, stage)
            assert entry["status"] == "done", (gen, stage)
            for key, value in entry["outputs"].items():
                if isinstance(value, str) and key not in ("adapter",):
                    assert Path(value).exists(), (gen, stage, key, value)
        metrics = state.stage(gen, "eval")["metrics"]
        assert metrics and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    store = store_of(finished_run)
    n_train = store.count("samples", "split = 'train'", version="gen-000")
    for gen in (1, 2):
        ids = (
            store.read("annotations", ["id"], f"generation = {gen}", version=f"gen-{gen:03d}").column("id").to_pylist()
        )
        assert len(ids) == len(set(ids)) == n_train  # every training image annotated exactly once
    # gen 2 also learns from gen 1's best-scored annotations (lvlm.align_add_best, lvlm.sft_add_best)
    align = [state.stage(g, "align")["metrics"] for g in (1, 2)]
    assert align[0]["align/examples_previous"] == 0 < align[1]["align/examples_previous"]
    assert (
        align[0]["align/examples_alt_text"] > 0 and align[1]["align/examples_seed"] == align[0]["align/examples_seed"]
    )
    assert state.stage(2, "sft")["metrics"]["sft/examples"] > state.stage(1, "sft")["metrics"]["sft/examples"]


def _wait_for(pred, timeout, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_kill_anywhere_then_resume_matches_uninterrupted(finished_run, tmp_path):
    """SIGKILL inside align, sft, annotate, train and eval; the same command finishes the run, with no
    annotation row duplicated or missing and the same final metrics as the uninterrupted run."""
    cfg = tiny(tmp_path, "killed")
    cmd = [sys.executable, "-m", "cycle.cli", "run", str(TINY_YAML), f"root={tmp_path}", "name=killed"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    rng = random.Random(0)
    killed_inside = []
    # Short stages (align, eval: about a second here) get short delays, and a second chance in gen 2.
    targets = [
        (1, "align"),
        (1, "sft"),
        (1, "annotate"),
        (1, "train"),
        (1, "eval"),
        (2, "align"),
        (2, "annotate"),
        (2, "train"),
        (2, "eval"),
    ]
    for gen, stage in targets:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        state_path = cfg.run_dir / "state.json"

        def running(state_path=state_path, gen=gen, stage=stage):
            if not state_path.exists():
                return False
            try:
                entry = json.loads(state_path.read_text())["generations"].get(str(gen), {}).get(stage, {})
            except ValueError:
                return False
            return entry.get("status") == "running"

        assert _wait_for(running, 600, proc), proc.stderr.read().decode()[-2000:]
        time.sleep(rng.uniform(0.0, 0.2 if stage in ("align", "eval") else 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not RunState(cfg.run_dir).is_done(gen, stage):
            killed_inside.append(f"{gen}:{stage}")
    assert {ref.split(":")[1] for ref in killed_inside} == {"align", "sft", "annotate", "train", "eval"}, killed_inside
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    store = store_of(cfg)
    n_train = store.count("samples", "split = 'train'", version="gen-000")
    for g in (1, 2):
        ids = store.read("annotations", ["id"], f"generation = {g}", version=f"gen-{g:03d}").column("id").to_pylist()
        assert len(ids) == len(set(ids)) == n_train
    ref, got = final_metrics(finished_run.run_dir), final_metrics(cfg.run_dir)
    assert ref.keys() == got.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-4), key  # tolerance: 1e-4 absolute on each metric


def test_changed_config_refused_then_redo_from(finished_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, run_dir)
    cfg = tiny(tmp_path, "copy", "loss.hni_weight=0.5")
    with pytest.raises(
        ConfigChanged, match=r"generation 1 stage 'train'.*loss\.hni_weight: 1\.0 -> 0\.5.*--from 1:train"
    ):
        run_cycle(cfg, progress=False)
    before = RunState(run_dir)
    state = run_cycle(cfg, redo_from="1:train", progress=False, stop_after="1:train")
    assert state.stage(1, "train")["finished"] > before.stage(1, "train")["finished"]
    assert state.stage(1, "annotate")["finished"] == before.stage(1, "annotate")["finished"]
    assert not state.is_done(1, "eval") and not state.is_done(2, "train")  # later stages are redone too


def test_llava_parts_are_stored_once_per_run(finished_run):
    """The LM does not change between generations (no carry): every LLaVA of the run links one LM file;
    each generation's aligned LLaVA links its base's tower, and the merged SFT output its aligned tower."""
    state = RunState(finished_run.run_dir)
    base = {g: Path(state.outputs(g, "lvlm")["lvlm"]) for g in (1, 2)}
    aligned = {g: Path(state.outputs(g, "align")["lvlm"]) for g in (1, 2)}
    merged = {g: Path(state.outputs(g, "sft")["merged"]) for g in (1, 2)}
    lm = base[1] / "lm.safetensors"
    assert all((d[g] / "lm.safetensors").samefile(lm) for d in (base, aligned) for g in (1, 2))
    for g in (1, 2):
        assert (aligned[g] / "tower.safetensors").samefile(base[g] / "tower.safetensors")
        assert (merged[g] / "tower.safetensors").samefile(aligned[g] / "tower.safetensors")
        assert not (merged[g] / "lm.safetensors").samefile(lm)  # full SFT changed the LM
    assert not (base[2] / "tower.safetensors").samefile(base[1] / "tower.safetensors")  # a new CLIP


def test_add_best_counts_from_generation_2(finished_run, tmp_path):
    """`lvlm.*_add_best` act from generation 2: changing them after generation 1 leaves it valid."""
    run_dir = tmp_path / "more-best"
    shutil.copytree(finished_run.run_dir, run_dir)
    for key, stage in (("lvlm.sft_add_best", "sft"), ("lvlm.align_add_best", "align")):
        cfg = tiny(tmp_path, "more-best", f"{key}=0.9")
        with pytest.raises(ConfigChanged, match=rf"generation 2 stage '{stage}'.*{key.replace('.', '[.]')}"):
            run_cycle(cfg, progress=False)


def test_clip_init_counts_from_generation_1(finished_run, tmp_path):
    """`clip.init` acts from generation 1 (generation 0 has no previous CLIP): changing it leaves generation 0's
    training valid, with the fingerprint recorded before, and refuses generation 1's."""
    run_dir = tmp_path / "init"
    shutil.copytree(finished_run.run_dir, run_dir)
    cfg = tiny(tmp_path, "init", "clip.init=previous")
    with pytest.raises(ConfigChanged, match=r"generation 1 stage 'train'.*clip\.init: 'scratch' -> 'previous'"):
        run_cycle(cfg, progress=False)


def _refused_then_redone_at_1_train(finished_run, tmp_path, override: str, changed: str) -> RunState:
    """A copy of the finished run under `override`: generation 0 stays valid, generation 1's training is refused
    naming `changed` (a regex), then redone alone."""
    shutil.copytree(finished_run.run_dir, tmp_path / "changed")
    cfg = tiny(tmp_path, "changed", override)
    with pytest.raises(ConfigChanged, match=r"generation 1 stage 'train'.*" + changed):
        run_cycle(cfg, progress=False)
    return run_cycle(cfg, redo_from="1:train", progress=False, stop_after="1:train")


def test_seed_texts_count_from_generation_1_and_reach_training(finished_run, tmp_path):
    """`loss.seed_texts: teacher` refuses generation 1's recorded training (generation 0 has no annotations and
    stays valid); trained again, CLIP_1's recorded inputs pin the data stage's teacher table."""
    state = _refused_then_redone_at_1_train(
        finished_run, tmp_path, "loss.seed_texts=teacher", r"loss\.seed_texts: None -> 'teacher'"
    )
    trained = json.loads((Path(state.outputs(1, "train")["clip"]).parent / "checkpoints" / "run.json").read_text())
    assert trained["loss"]["seed_texts"] == "teacher"
    assert trained["data"]["teacher"] == state.outputs(0, "data")["teacher_version"]


def test_epochs_per_generation_count_where_they_differ(finished_run, tmp_path):
    """`train.epochs_per_generation` [2, 3] (the tiny config trains 2 epochs): generation 0's training keeps its
    recorded fingerprint, generation 1's is refused (`train.epochs: 2 -> 3`) and trains 3 epochs when redone."""
    state = _refused_then_redone_at_1_train(
        finished_run, tmp_path, "train.epochs_per_generation=[2,3]", r"train\.epochs: 2 -> 3"
    )
    plans = {
        g: json.loads((Path(state.outputs(g, "train")["log"])).read_text().splitlines()[0])["plan"] for g in (0, 1)
    }
    assert plans[1]["total_steps"] == 3 * plans[1]["steps_per_epoch"]
    assert plans[0]["total_steps"] == 2 * plans[0]["steps_per_epoch"]
    with pytest.raises(ConfigError, match="config key 'train.epochs_per_generation'"):
        tiny(tmp_path, "bad", "train.epochs_per_generation=[2,0]")


def test_carried_annotator_starts_from_the_previous_one(finished_run, tmp_path):
    """lvlm.carry: generation 2's LLaVA takes generation 1's annotator (LM + projector) under CLIP_1, and
    its alignment and SFT run the carried epochs; generations 0-1 are untouched (the key counts from gen 2)."""
    run_dir = tmp_path / "carry"
    shutil.copytree(finished_run.run_dir, run_dir)
    cfg = tiny(tmp_path, "carry", "lvlm.carry.enabled=true", "lvlm.carry.align_epochs=2", "lvlm.carry.sft_epochs=3")
    with pytest.raises(ConfigChanged, match=r"generation 2 stage 'lvlm'.*lvlm\.carry"):
        run_cycle(cfg, progress=False)
    before = RunState(run_dir)
    state = run_cycle(cfg, redo_from="2:lvlm", progress=False, stop_after="2:sft")
    assert state.stage(1, "sft")["finished"] == before.stage(1, "sft")["finished"]
    info = json.loads((Path(state.outputs(2, "lvlm")["lvlm"]) / "info.json").read_text())
    assert info["base"] == state.outputs(1, "sft")["merged"] and info["projector"] == "reused"
    assert state.stage(2, "align")["metrics"]["align/epochs"] == 2
    assert state.stage(2, "sft")["metrics"]["sft/epochs"] == 3
    assert before.stage(2, "sft")["metrics"]["sft/epochs"] == 12


def test_second_controller_refused(finished_run):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys,time; from cycle.state import RunLock; RunLock(sys.argv[1]).acquire();"
                " print('x', flush=True); time.sleep(60)"
            ),
            str(finished_run.run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "x"
        with pytest.raises(RunLocked, match="in use by another controller"):
            run_cycle(finished_run, progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_status_inspect_export_cli(finished_run, tmp_path):
    runner = CliRunner()
    run_dir = str(finished_run.run_dir)
    res = runner.invoke(main, ["status", run_dir])
    assert res.exit_code == 0 and "annotate" in res.output and "done" in res.output
    res = runner.invoke(main, ["inspect", run_dir, "--sample", "2", "--image-out", str(tmp_path / "img")])
    assert res.exit_code == 0, res.output
    assert "gen-1" in res.output and "gen-2" in res.output and "alt-text" in res.output
    assert len(list((tmp_path / "img").iterdir())) == 2
    res = runner.invoke(main, ["export", run_dir, "--gen", "2", "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "exp" / "clip-hf" / "config.json").exists()
    assert (tmp_path / "exp" / "lvlm-hf" / "config.json").exists()
    docs = list((tmp_path / "exp" / "data-json").glob("*.json"))
    assert docs and set(json.loads(docs[0].read_text())) >= {"desc", "neg_desc", "tags", "neg_tags"}
    res = runner.invoke(
        main,
        ["export", run_dir, "--gen", "1", "--what", "data", "--data-format", "wds", "--out", str(tmp_path / "wds")],
    )
    assert res.exit_code == 0 and list((tmp_path / "wds" / "data-wds").glob("shard-*.tar"))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    res = CliRunner().invoke(main, ["report", str(finished_run.run_dir)])
    assert res.exit_code == 0, res.output
    page = finished_run.run_dir / "report" / "index.html"
    assert (page.parent / "metrics.png").exists() and (page.parent / "loss.png").exists()
    dom = chromium_dom(page, tmp_path)
    assert "Held-out metrics per generation" in dom
    images = int(dom.split('data-images="')[1].split('"')[0])
    loaded = int(dom.split('data-images-loaded="')[1].split('"')[0])
    assert images >= 3 and loaded == images  # both plots and every gallery picture


def test_early_stop_when_the_selection_metric_stops_improving(finished_run, tmp_path, caplog):
    """Asked for more generations with patience 1, the controller stops without building generation 3
    when the chosen metric did not improve in generation 1 or 2 (a metric picked from the run so)."""
    run_dir = tmp_path / "more"
    shutil.copytree(finished_run.run_dir, run_dir)
    state = RunState(run_dir)
    metrics = [state.stage(g, "eval")["metrics"] for g in (0, 1, 2)]
    flat = [
        k
        for k, v in metrics[0].items()
        if isinstance(v, float)
        and metrics[1].get(k, v) <= v
        and metrics[2].get(k, v) <= v
        and not k.endswith(("n_images", "n_texts"))
    ]
    assert flat, "no metric got worse or stayed equal: nothing to test early stopping with"
    cfg = tiny(
        tmp_path, "more", "cycle.generations=3", "cycle.early_stop_patience=1", f"cycle.early_stop_metric={flat[0]}"
    )
    with caplog.at_level("INFO", logger="cycle.controller"):
        state = run_cycle(cfg, progress=False)
    assert 3 not in state.generations
    assert any("stopping early" in m and flat[0] in m for m in caplog.messages)


@pytest.mark.parametrize(
    "option,ref,message",
    [
        ("redo_from", "-1:train", "generations 0 to 2"),
        ("redo_from", "9:train", "generations 0 to 2"),
        ("redo_from", "x", "expected GEN:STAGE"),
        ("stop_after", "1:anotate", "generation 1 has stages"),
        ("redo_from", "0:annotate", "generation 0 has stages"),
    ],
)
def test_stage_refs_checked_before_anything_happens(finished_run, option, ref, message):
    state_before = (finished_run.run_dir / "state.json").read_bytes()
    with pytest.raises(HQClipError, match=message):
        run_cycle(finished_run, progress=False, **{option: ref})
    assert (finished_run.run_dir / "state.json").read_bytes() == state_before
    assert store_of(finished_run).count("annotations") > 0  # nothing dropped


def test_refused_run_leaves_config_yaml_as_it_was(finished_run, tmp_path):
    run_dir = tmp_path / "keep"
    shutil.copytree(finished_run.run_dir, run_dir)
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigChanged):
        run_cycle(tiny(tmp_path, "keep", "loss.hni_weight=0.25"), progress=False)
    assert (run_dir / "config.yaml").read_text() == before


def test_missing_output_of_a_done_stage_is_redone(finished_run, caplog):
    """A stage recorded as done whose output folder was deleted reruns (and every stage after it)."""
    eval_dir = finished_run.run_dir / "gen-002" / "eval"
    before = RunState(finished_run.run_dir).stage(2, "eval")
    shutil.rmtree(eval_dir)
    with caplog.at_level("WARNING", logger="cycle.controller"):
        state = run_cycle(finished_run, progress=False)
    assert any("stage 'eval' is recorded as done but" in m for m in caplog.messages)
    assert (eval_dir / "metrics.json").is_file()
    assert state.stage(2, "eval")["finished"] > before["finished"]
    assert state.stage(2, "eval")["metrics"] == before["metrics"]
    assert state.stage(2, "train")["finished"] == RunState(finished_run.run_dir).stage(2, "train")["finished"]


def test_a_stage_that_fails_is_recorded_failed_not_running(tmp_path):
    cfg = tiny(tmp_path, "empty", "data.source=store")
    with pytest.raises(HQClipError, match="samples table is empty: ingest first"):
        run_cycle(cfg, progress=False)
    entry = RunState(cfg.run_dir).stage(0, "data")
    assert entry["status"] == "failed" and "ingest first" in entry["error"]


def test_export_of_a_generation_whose_clip_was_deleted_is_one_line(finished_run, tmp_path):
    run_dir = tmp_path / "gone"
    shutil.copytree(finished_run.run_dir, run_dir)
    state = run_dir / "state.json"  # the copy's record points at the copy's folders
    state.write_text(state.read_text().replace(str(finished_run.run_dir), str(run_dir)))
    shutil.rmtree(run_dir / "gen-001" / "clip")
    res = CliRunner().invoke(main, ["export", str(run_dir), "--gen", "1", "--out", str(tmp_path / "exp")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "stage 'train' is recorded as done but" in res.output and "hqclip run" in res.output
