"""The cycle controller: sequences the stages of every generation and records state. Nothing else.

Resume is the same command again: finished stages whose input fingerprint still matches are skipped;
the first unfinished stage runs (annotation and training resume inside themselves from what they wrote).
A finished stage whose inputs changed is refused, naming the changed keys, unless the user redoes from
there (`redo_from="2:train"`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from .config import RunConfig, fingerprint, save_config
from .pipeline import ALL_STAGES, STAGES, Context, stages_of
from .state import RunLock, RunState
from .store import Store


class ConfigChanged(RuntimeError):
    """A finished stage's inputs differ from what it was run with."""


def store_of(cfg: RunConfig) -> Store:
    return Store(cfg.store.uri or cfg.run_dir / "lance")


def parse_stage_ref(ref: str) -> tuple[int, str]:
    """'2:train' -> (2, 'train'); '1' -> (1, first stage of gen 1)."""
    gen_s, _, stage = ref.partition(":")
    try:
        gen = int(gen_s)
    except ValueError:
        raise ValueError(f"--from '{ref}': expected GEN:STAGE, e.g. 1:annotate") from None
    stage = stage or stages_of(gen)[0]
    if stage not in stages_of(gen):
        raise ValueError(f"--from '{ref}': generation {gen} has stages {', '.join(stages_of(gen))}")
    return gen, stage


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return keys


def run_cycle(cfg: RunConfig, redo_from: Optional[str] = None, progress: bool = True,
              log: Callable[[str], None] = print, stop_after: Optional[str] = None) -> RunState:
    """Run (or resume) generation 0 and `cfg.cycle.generations` more. `stop_after='1:sft'` stops early."""
    run_dir = Path(cfg.run_dir)
    if cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    with RunLock(run_dir) as lock:
        if lock.took_over_from:
            log(f"took over the stale lock of pid {lock.took_over_from.get('pid')} (it is no longer running)")
        state = RunState(run_dir)
        store = store_of(cfg)
        if redo_from:
            gen, stage = parse_stage_ref(redo_from)
            dropped = state.forget_from(gen, ALL_STAGES, stage)
            for ref in dropped:
                g, s = ref.split(":")
                clear_stage(run_dir, store, int(g), s)
            log(f"redoing from {gen}:{stage} ({len(dropped)} finished stage(s) dropped)")
        save_config(cfg, run_dir)
        ctx = Context(cfg, run_dir, store, lambda g, s: state.stage(g, s).get("outputs", {}), progress)
        best, since_best = None, 0
        for gen in range(cfg.cycle.generations + 1):
            for stage in stages_of(gen):
                inputs_fn, run_fn = STAGES[stage]
                inputs = inputs_fn(ctx, gen)
                fp = fingerprint(inputs)
                entry = state.stage(gen, stage)
                if entry.get("status") == "done":
                    if entry.get("fingerprint") == fp:
                        continue
                    diff = changed_keys(entry.get("inputs", {}), inputs)
                    raise ConfigChanged(
                        f"generation {gen} stage '{stage}' finished with other inputs ({'; '.join(diff[:4])}"
                        f"{' ...' if len(diff) > 4 else ''}): keep the old config, or redo with --from {gen}:{stage}")
                if entry.get("status") == "running" and entry.get("fingerprint") != fp:
                    clear_stage(run_dir, store, gen, stage)  # partial work made with other inputs
                log(f"[gen {gen}] {stage} ...")
                state.mark_running(gen, stage, fp, inputs)
                outputs, metrics = run_fn(ctx, gen)
                state.mark_done(gen, stage, fp, outputs, metrics)
                if stop_after == f"{gen}:{stage}":
                    return state
            store.compact()  # between generations, with no writer running; tagged versions stay
            metric = state.stage(gen, "eval").get("metrics", {}).get(cfg.cycle.early_stop_metric)
            if metric is not None and (best is None or metric > best):
                best, since_best = metric, 0
            elif metric is not None:
                since_best += 1
                if cfg.cycle.early_stop_patience and since_best >= cfg.cycle.early_stop_patience:
                    log(f"stopping early: {cfg.cycle.early_stop_metric} has not improved for {since_best} generation(s)")
                    break
        return state


def clear_stage(run_dir: Path, store: Store, gen: int, stage: str) -> None:
    """Remove what a stage wrote, so redoing it starts clean (the LanceDB rows of its generation too)."""
    gen_dir = run_dir / f"gen-{gen:03d}"
    paths = {"lvlm": ["lvlm/base"], "align": ["lvlm/aligned"], "sft": ["lvlm/sft"], "annotate": ["annotate"],
             "train": ["clip"], "eval": ["metrics.json"], "data": []}[stage]
    for rel in paths:
        p = gen_dir / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if stage == "annotate" and store.has("annotations"):
        store.delete("annotations", f"generation = {gen}", drop_tag=f"gen-{gen:03d}")
