"""benchmarks/evidence_loss.py on a minuscule setting: the teacher generation it writes, what each variant
trains with, the seed spread it reports, resuming, and the inputs it refuses."""

from __future__ import annotations

import importlib.util
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"
# 64 training scenes at 32 px, batch 16, one epoch: 4 steps per run.
MICRO = [
    "clip.name=hqclip-micro",
    "data.emoji.n_train=64",
    "data.emoji.n_val=16",
    "data.emoji.n_test_retrieval=16",
    "data.emoji.n_test_negatives=16",
    "data.emoji.n_test_compositional=12",
    "train.batch_size=16",
    "train.epochs=1",
    "train.checkpoint_every=100",
    "loss.stc_min_count=1",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("evidence_loss", REPO / "benchmarks" / "evidence_loss.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ev = _load_script()


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """All five variants with seed 0, and (b) again with seed 1: six short DeepSpeed runs."""
    cfg = ev.base_config(TINY_YAML, MICRO, threads=1)
    work = tmp_path_factory.mktemp("evidence-loss")
    pins, results = ev.run_ablation(cfg, work, ev.VARIANTS, [0], progress=False, log=lambda _: None)
    _, more = ev.run_ablation(cfg, work, [ev.VARIANT_BY_KEY["b"]], [1], progress=False, log=lambda _: None)
    return cfg, work, pins, results + more


@pytest.mark.slow
def test_teacher_generation_covers_every_training_scene(ablation):
    from cycle.annotate.schema import prompt_hash
    from cycle.store import Store

    cfg, work, pins, _ = ablation
    store = Store(work / "lance")
    assert store.tags("annotations") == {"gen-001": pins["annotations_version"]}
    rows = store.read("annotations", version="gen-001").to_pylist()
    seeds = {r["id"]: r for r in store.read("teacher").to_pylist()}
    assert pins["n_train"] == cfg.data.emoji.n_train == len(rows) == len(seeds)
    for r in rows:
        assert (r["generation"], r["status"], r["annotator"], r["prompt_hash"]) == (1, "ok", ev.TEACHER, prompt_hash())
        assert all(r[k] == seeds[r["id"]][k] for k in ("desc", "neg_desc", "tags", "neg_tags"))
    # a second preparation finds everything in place and writes nothing
    versions = {t: store.table(t).version for t in ("samples", "teacher", "annotations")}
    assert ev.prepare_store(cfg, work / "lance", progress=False) == pins
    assert {t: store.table(t).version for t in versions} == versions


@pytest.mark.slow
def test_each_variant_trains_with_its_terms(ablation):
    _, _, _, results = ablation
    by_run = {(r["variant"], r["seed"]): r for r in results}
    assert set(by_run) == {(k, 0) for k in "abcde"} | {("b", 1)}
    for (key, _), r in by_run.items():
        v, s = ev.VARIANT_BY_KEY[key], r["train_summary"]
        assert s["use_annotations"] is v.teacher
        assert (s["hni_weight"] > 0, s["stc_weight"] > 0) == (v.hni, v.stc)
        assert (s["tag_vocab_size"] > 0) == v.stc
        for metric, _ in ev.METRICS:
            assert 0.0 <= r["metrics"][metric] <= 1.0


@pytest.mark.slow
def test_seeds_change_the_run_and_the_report_shows_their_spread(ablation):
    from safetensors.torch import load_file

    cfg, work, pins, results = ablation
    w0 = load_file(work / "runs" / "b-s0" / "clip" / "model" / "open_clip_model.safetensors")
    w1 = load_file(work / "runs" / "b-s1" / "clip" / "model" / "open_clip_model.safetensors")
    assert any(not w0[k].equal(w1[k]) for k in w0)
    assert not (work / "runs" / "b-s0" / "clip" / "checkpoints").exists()  # only the final model is kept

    summary = ev.summarise(results)
    assert summary["b"]["seeds"] == [0, 1] and summary["a"]["seeds"] == [0]
    for metric, _ in ev.METRICS:
        values = [r["metrics"][metric] for r in results if r["variant"] == "b"]
        assert summary["b"][metric] == pytest.approx((statistics.fmean(values), statistics.stdev(values)))
    by_run = {(r["variant"], r["seed"]): r["metrics"] for r in results}
    diff = ev.paired_differences(results, "c", "b")["test_negatives/acc"]  # seed 0 is the only one both have
    delta = by_run[("c", 0)]["test_negatives/acc"] - by_run[("b", 0)]["test_negatives/acc"]
    assert diff[0] == pytest.approx(delta) and math.isnan(diff[1]) and diff[2:] == (int(delta > 0), int(delta < 0))

    text = ev.markdown_report(ev.shared_sections(cfg), pins, results, wall_s=60.0, threads=1)
    mean, std = summary["b"]["test_zeroshot/top1"]
    assert f"| (b) teacher, L_clip | {mean:.3f} ± {std:.3f} |" in text
    # 5 variant rows, 5 paired comparisons, one row per run
    assert sum(line.startswith("| (") for line in text.splitlines()) == 5 + len(ev.COMPARISONS) + len(results)


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_refuses_other_configs(ablation, tmp_path):
    cfg, work, pins, results = ablation
    done = work / "runs" / "c-s0" / "result.json"
    stamp = done.stat().st_mtime_ns
    _, again = ev.run_ablation(cfg, work, [ev.VARIANT_BY_KEY["c"]], [0], progress=False, log=lambda _: None)
    assert again == [r for r in results if (r["variant"], r["seed"]) == ("c", 0)]
    assert done.stat().st_mtime_ns == stamp

    # the command line over finished runs: nothing is trained again, the report is written and printed
    out = tmp_path / "report.md"
    ev.main(
        [
            "--config",
            str(TINY_YAML),
            "--work",
            str(work),
            "--seeds",
            "0",
            "--variants",
            "a,c",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
            *MICRO,
        ]
    )
    assert done.stat().st_mtime_ns == stamp
    assert "| (c) - (b) |" not in out.read_text() and "| (c) teacher, L_clip + HNI |" in out.read_text()
    with pytest.raises(SystemExit):
        ev.main(["--config", str(TINY_YAML), "--work", str(work), "--variants", "a,x", *MICRO])

    # a setting the runs do not depend on (the LVLM's) keeps them; one they depend on is refused
    unrelated = ev.base_config(TINY_YAML, [*MICRO, "lvlm.lm.hidden_size=32"], threads=1)
    reused = ev.run_variant(unrelated, work / "lance", pins, ev.VARIANT_BY_KEY["c"], 0, work / "runs" / "c-s0")
    assert reused == again[0] and done.stat().st_mtime_ns == stamp
    other = ev.base_config(TINY_YAML, [*MICRO, "train.lr=1e-3"])
    with pytest.raises(ValueError, match="another config"):
        ev.run_variant(other, work / "lance", pins, ev.VARIANT_BY_KEY["c"], 0, work / "runs" / "c-s0")

    # a gen-001 that misses training scenes (made by something else) is refused before any training
    copy = tmp_path / "lance"
    shutil.copytree(work / "lance", copy)
    from cycle.store import Store

    store = Store(copy)
    victim = sorted(store.ids("annotations"))[0]
    store.delete("annotations", f"id = '{victim}'", drop_tag="gen-001")
    store.tag("annotations", "gen-001")
    with pytest.raises(ValueError, match="1 of 64 training scenes have no teacher annotation"):
        ev.prepare_store(cfg, copy, progress=False)


def test_bad_inputs_are_refused_with_the_key_named():
    with pytest.raises(ValueError, match="expected a comma list of a, b, c, d, e"):
        ev.parse_variants("a,z")
    with pytest.raises(ValueError, match="expected a comma list"):
        ev.parse_variants(" , ")
    for bad in ("0,x", "1,1", "-1", ""):
        with pytest.raises(ValueError, match="distinct non-negative integers"):
            ev.parse_seeds(bad)
    assert ev.parse_seeds("2,0,1") == [2, 0, 1] and [v.key for v in ev.parse_variants("e,a,e")] == ["e", "a"]
    with pytest.raises(ValueError, match="loss.hni_weight"):
        ev.base_config(TINY_YAML, ["loss.hni_weight=0"])
    with pytest.raises(ValueError, match="loss.stc_weight"):
        ev.base_config(TINY_YAML, ["loss.stc_weight=-1"])
    with pytest.raises(ValueError, match="data.source"):
        ev.base_config(TINY_YAML, ["data.source=store"])
    cfg = ev.base_config(TINY_YAML, ["data.emoji.seed_share=0.2"])
    assert cfg.data.emoji.seed_share == 1.0  # every training scene gets its teacher annotation


def test_variant_config_sets_weights_and_both_seeds():
    cfg = ev.base_config(TINY_YAML, ["loss.hni_weight=0.5", "loss.stc_weight=2"])
    c = ev.variant_config(cfg, ev.VARIANT_BY_KEY["c"], 7)
    assert (c.loss.hni_weight, c.loss.stc_weight, c.seed, c.train.seed) == (0.5, 0.0, 7, 7)
    d = ev.variant_config(cfg, ev.VARIANT_BY_KEY["d"], 3)
    assert (d.loss.hni_weight, d.loss.stc_weight, d.loss.long_text_prob) == (0.0, 2.0, cfg.loss.long_text_prob)
    mean, std = ev.mean_std([0.25])
    assert mean == 0.25 and math.isnan(std)  # a single seed has no spread
