"""`hqclip lvlm train` and `hqclip lvlm ask` on a run directory holding the synthetic shapes store."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from lvlm_fixtures import shape_png, shapes_rows

from cycle.cli import main

SMALL = [
    "lvlm.lm.pretrain_epochs=2",
    "lvlm.align.epochs=1",
    "lvlm.sft.epochs=1",
    "lvlm.lora.enabled=false",
    "device=cpu",
]


def test_lvlm_train_then_ask(tmp_path):
    from cycle.clip.model import create_clip
    from cycle.clip.saved import save_clip
    from cycle.store import Store

    run = tmp_path / "run"
    store = Store(run / "lance")
    samples, seeds = shapes_rows(16)
    store.append("samples", samples)
    store.insert_new("teacher", seeds)
    torch.manual_seed(0)
    clip, _, _, _ = create_clip("hqclip-micro")
    clip_dir = save_clip(clip, "hqclip-micro", tmp_path / "clip")
    runner = CliRunner()

    result = runner.invoke(main, ["lvlm", "train", str(clip_dir), "--run", str(run), "--no-progress", *SMALL])
    assert result.exit_code == 0, result.output
    assert "sft/loss_after:" in result.output and "adapter: None" in result.output
    merged = run / "lvlm-manual" / "sft" / "merged"
    assert (merged / "config.json").is_file()

    image = tmp_path / "red.png"
    image.write_bytes(shape_png("red", "circle", "left"))
    result = runner.invoke(
        main, ["lvlm", "ask", str(merged), str(image), "--alt", "red circle", "--max-new-tokens", "8"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith('{"image"')]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert line["image"] == str(image) and isinstance(line["answer"], str)


def test_lvlm_cli_bad_inputs(tmp_path):
    from cycle.store import Store

    runner = CliRunner()
    Store(tmp_path / "run" / "lance")  # empty run: no seed table
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    result = runner.invoke(main, ["lvlm", "train", str(clip_dir), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no teacher annotations" in result.output
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = runner.invoke(main, ["lvlm", "ask", str(clip_dir), str(bad)])
    assert result.exit_code == 2 and "cannot read image" in result.output
