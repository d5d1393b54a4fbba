"""`hqclip lvlm ...`: build and train one generation's LVLM by hand, or ask it about images.

Registered on the root command in `cycle/cli.py`. Thin: settings, store, the stage functions, a summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..config import AnnotateConfig
from ..errors import HQClipError

STAGES = ("lm", "build", "align", "sft")


def _settings(run_dir: str, config_path, overrides):
    """(config, store, samples version, teacher version): the data stage's pinned versions when the run has
    them, else the tables' current versions."""
    from ..cli_common import pinned_data, run_config
    from ..store import Store

    cfg = run_config(run_dir, config_path, overrides)
    store = Store.from_config(cfg, run_dir)
    outputs = pinned_data(run_dir)
    if not store.has("teacher") or store.count("teacher") == 0:
        raise HQClipError(f"no teacher annotations in {store.uri}: build the data or import a seed set first")
    return (
        cfg,
        store,
        outputs.get("samples_version", store.version("samples")),
        outputs.get("teacher_version", store.version("teacher")),
    )


@click.group()
def lvlm():
    """The LVLM annotator: a LLaVA whose vision tower is a CLIP checkpoint."""


@lvlm.command("train")
@click.argument("clip_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("overrides", nargs=-1)
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--out", type=click.Path(file_okay=False), help="Default: RUN/lvlm-manual.")
@click.option("--stop-after", type=click.Choice(STAGES), default="sft", show_default=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Default: RUN/config.yaml if any.")
@click.option("--progress/--no-progress", default=True)
def lvlm_train(clip_dir, overrides, run_dir, out, stop_after, config_path, progress):
    """LM -> LLaVA on CLIP_DIR -> projector alignment -> SFT, each cached in OUT; prints the metrics.

    OVERRIDES are key=value pairs, e.g. `lvlm.lora.enabled=false lvlm.sft.epochs=3`.
    """
    from . import align_projector, build_lvlm, prepare_lm, run_texts, sft

    cfg, store, sv, teacher_v = _settings(run_dir, config_path, overrides)
    out = Path(out) if out else Path(run_dir) / "lvlm-manual"
    last = STAGES.index(stop_after)
    metrics: dict = {}
    lm = prepare_lm(
        cfg.lvlm.lm,
        run_texts(store, sv, teacher_v, cfg),
        out / "lm",
        seed=cfg.seed,
        progress=progress,
        device=cfg.device,
    )
    click.echo(f"lm: {lm}")
    if last >= 1:
        model = build_lvlm(clip_dir, lm, cfg.lvlm, out / "base", seed=cfg.seed)
        click.echo(f"base: {model}")
    if last >= 2:
        model, m = align_projector(model, store, sv, teacher_v, cfg, out / "aligned", progress=progress)
        metrics.update(m)
        click.echo(f"aligned: {model}")
    if last >= 3:
        adapter, merged, m = sft(model, store, sv, teacher_v, cfg, out / "sft", progress=progress)
        metrics.update(m)
        click.echo(f"adapter: {adapter}\nmerged: {merged}")
    for key, value in metrics.items():
        click.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


@lvlm.command("ask")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--alt", "alt_text", default="", help="The alt-text given as the reference.")
@click.option("--max-new-tokens", default=AnnotateConfig.max_new_tokens, show_default=True)
def lvlm_ask(model_dir, images, alt_text, max_new_tokens):
    """Greedy answers of an LVLM directory for IMAGES, with the annotation prompt; one JSON line each."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..annotate.schema import build_prompt, model_input
    from .assemble import load_lvlm

    try:
        pictures = [Image.open(p).convert("RGB") for p in images]
    except (UnidentifiedImageError, OSError) as err:
        raise HQClipError(f"cannot read image: {err}") from None
    try:
        model, processor = load_lvlm(model_dir)
    except (OSError, ValueError) as err:  # transformers' own errors for a directory that is not a model
        raise HQClipError(f"cannot load an LVLM from '{model_dir}': {str(err).splitlines()[0]}") from None
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        images=pictures, text=[model_input(build_prompt(alt_text))] * len(pictures), return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(out[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    for path, answer in zip(images, answers):
        click.echo(json.dumps({"image": str(path), "answer": answer}, ensure_ascii=False))
