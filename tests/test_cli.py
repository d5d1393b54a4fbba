"""The command line's shared behaviour: one error boundary (exit 2, one red line, no traceback), one
override syntax, shipped configs by name, logging set up once, data printed through rich escaped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, TINY_YAML

from cycle.cli import main
from cycle.cli_common import config_file, setup_logging
from cycle.config import ConfigError, load_config, save_config
from cycle.errors import HQClipError
from cycle.files import safe_name
from cycle.state import RunState
from cycle.store import Store


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", str(TINY_YAML), "train.epochz=3"], "config key 'train.epochz'"),
        (["run", "no/such/config.yaml"], "config file 'no/such/config.yaml' does not exist"),
        (["run", "nonesuch"], "nor is it a shipped config: emoji, real-7b-80gb, real-vitb16, tiny"),
        (["data", "build", "emoji-scenes", "--out", "x", "data.emoji.image_size=8"], "data.emoji.image_size"),
        (["demo", "--config", str(TINY_YAML), "loss.hni_mode=foo"], "config key 'loss.hni_mode'"),
        (["status", "no-such-run"], "is not a run directory"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a failing command might create lands in the checkout
    line = _one_error_line(CliRunner().invoke(main, args))
    assert expected in line


def test_yaml_syntax_error_in_a_real_process(tmp_path):
    """The installed entry point's path (`python -m cycle.cli`): exit 2, one line on stderr naming the
    file and the place, nothing on stdout, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {epochs: 3\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "cycle.cli", "run", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"config file '{bad}' is not valid YAML (line" in lines[0]


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [x\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML \(line \d+, column \d+\): ") as err:
        load_config(bad)
    assert isinstance(err.value, HQClipError) and "\n" not in str(err.value)


def test_click_usage_errors_keep_working():
    result = CliRunner().invoke(main, ["export", "somewhere"])  # --gen is required
    assert result.exit_code == 2 and "Missing option '--gen'" in result.output
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only user errors are turned into one line: anything else is a bug and must stay visible."""
    import cycle.status

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text('{"generations": {}}')
    monkeypatch.setattr(cycle.status, "print_status", broken)
    result = CliRunner().invoke(main, ["status", str(run)])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)


def test_corrupt_state_is_one_line_naming_the_file_and_the_way_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_text("{not json")
    result = CliRunner().invoke(main, ["status", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "state.json is corrupt" in result.output and "hqclip doctor" in result.output


def test_shipped_configs_by_name_and_path():
    assert config_file("emoji") == config_file("emoji.yaml") == REPO / "cycle" / "configs" / "emoji.yaml"
    assert config_file(TINY_YAML) == TINY_YAML  # a path is taken as it is
    assert (REPO / "configs").resolve() == (REPO / "cycle" / "configs").resolve()  # the checkout's link
    with pytest.raises(ConfigError, match="shipped config"):
        config_file("sub/emoji")  # a name is a bare name; a path must exist
    assert load_config(config_file("tiny")) == load_config(TINY_YAML)


def test_logging_is_set_up_once_and_prints_data_as_is(capsys, monkeypatch):
    logger = logging.getLogger("cycle")
    before = list(logger.handlers)
    try:
        setup_logging("info")
        setup_logging("debug")  # again (tests invoke the CLI many times): replaces, does not add
        ours = [h for h in logger.handlers if getattr(h, "hqclip_cli", False)]
        assert len(ours) == 1 and logger.level == logging.DEBUG
        logging.getLogger("cycle.controller").info("[gen 1] train ... alt-text 'a cat [/b] on a mat'")
        err = capsys.readouterr().err
        assert "[gen 1] train" in err and "a cat [/b] on a mat" in err
        monkeypatch.setenv("HQCLIP_LOG_LEVEL", "warning")
        setup_logging(None)
        assert logger.level == logging.WARNING
        with pytest.raises(ConfigError, match="log level 'loud'"):
            setup_logging("loud")
    finally:
        for handler in [h for h in logger.handlers if h not in before]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_bad_log_level_from_the_environment_is_one_line():
    result = CliRunner().invoke(main, ["status", "x"], env={"HQCLIP_LOG_LEVEL": "loud"})
    assert "log level 'loud'" in _one_error_line(result)


@pytest.fixture
def markup_run(tmp_path):
    """A run directory whose data stage is done, with alt-text and ids that look like rich markup."""
    from PIL import Image

    from cycle.data.emoji.render import png_bytes

    cfg = load_config(None, [f"root={tmp_path}", "name=markup"])
    save_config(cfg, cfg.run_dir)
    store = Store(cfg.run_dir / "lance")
    image = png_bytes(Image.new("RGB", (8, 8), "red"))
    rows = [
        {
            "id": f"[b]id{i}",
            "image": image,
            "alt_text": "a cat [/b] on a mat [red]RED[/red] :smile:",
            "source": "t",
            "split": "train",
            "width": 8,
            "height": 8,
            "sha256": "x",
            "meta": None,
        }
        for i in range(2)
    ]
    version = store.append("samples", rows)
    RunState(cfg.run_dir).mark_done(0, "data", "fp", outputs={"samples_version": version})
    return cfg.run_dir


def test_inspect_prints_markup_like_data_as_is(markup_run, tmp_path):
    result = CliRunner().invoke(
        main, ["inspect", str(markup_run), "--id", "[b]id1", "--image-out", str(tmp_path / "img")]
    )
    assert result.exit_code == 0, result.output
    assert "a cat [/b] on a mat [red]RED[/red] :smile:" in result.output and "[b]id1" in result.output
    # the image is named by safe_name (ids are data, not file names), and the output says where it went
    assert [p.name for p in (tmp_path / "img").iterdir()] == [safe_name("[b]id1", "png")]
    assert safe_name("[b]id1", "png") in result.output
    result = CliRunner().invoke(main, ["inspect", str(markup_run), "--id", "absent"])
    assert "no sample matches" in _one_error_line(result)


def test_ingest_takes_positional_overrides(tmp_path):
    from PIL import Image

    from cycle.data.emoji.render import png_bytes

    root = tmp_path / "pics"
    root.mkdir()
    for i, side in enumerate((8, 32)):
        (root / f"p{i}.png").write_bytes(png_bytes(Image.new("RGB", (side, side), "blue")))
        (root / f"p{i}.txt").write_text(f"picture {i}")
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["data", "ingest", str(root), "--run", str(run), "--no-progress", "data.min_side=16", "store.write_batch=1"],
    )
    assert result.exit_code == 0, result.output
    store = Store(run / "lance")
    assert store.ids("samples") == {"p1"} and store.count("rejects", "reason = 'too_small'") == 1
    result = CliRunner().invoke(main, ["data", "ingest", str(root), "--run", str(run), "--set", "data.min_side=1"])
    assert result.exit_code == 2 and "No such option '--set'" in result.output
    result = CliRunner().invoke(main, ["data", "ingest", str(root), "--run", str(run), "store.write_batch=0"])
    assert "config key 'store.write_batch': got 0, expected >= 1" in _one_error_line(result)


def test_annotate_run_without_a_model_dir_takes_the_first_override(tmp_path):
    """MODEL_DIR is optional (openai, vLLM server backends): `annotate run key=value` is an override."""
    result = CliRunner().invoke(
        main, ["annotate", "run", "annotate.batch_size=0", "--run", str(tmp_path / "r"), "--gen", "1"]
    )
    assert "config key 'annotate.batch_size': got 0" in _one_error_line(result)
