"""The cycle controller: sequences the stages of every generation and records state. Nothing else.

Resume is the same command again: finished stages whose fingerprint (config keys + pins) still matches
are skipped; the first unfinished stage runs (annotation and training resume inside themselves from what
they wrote). A finished stage whose inputs changed is refused, naming the changed keys, unless the user
redoes from there (`redo_from="2:train"`). Everything is checked before anything is written: a refused
run leaves the run folder as it was.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from .config import RunConfig, fingerprint, save_config
from .device import free_accelerator_memory
from .errors import HQClipError
from .pipeline import ALL_STAGES, Stage, config_inputs, make_stages, stages_of, store_of
from .state import RunLock, RunState, gen_dir, missing_outputs
from .store import Store, gen_tag

log = logging.getLogger(__name__)


class ConfigChanged(HQClipError):
    """A finished stage's inputs differ from what it was run with."""


def parse_stage_ref(ref: str, generations: int, option: str = "--from") -> tuple[int, str]:
    """'2:train' -> (2, 'train'); '1' -> (1, first stage of gen 1); checked against the run's generations."""
    gen_s, _, stage = ref.partition(":")
    try:
        gen = int(gen_s)
    except ValueError:
        raise HQClipError(f"{option} '{ref}': expected GEN:STAGE, e.g. 1:annotate") from None
    if not 0 <= gen <= generations:
        raise HQClipError(f"{option} '{ref}': this run has generations 0 to {generations} (cycle.generations)")
    stage = stage or stages_of(gen)[0]
    if stage not in stages_of(gen):
        raise HQClipError(f"{option} '{ref}': generation {gen} has stages {', '.join(stages_of(gen))}")
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


def stage_inputs(cfg: RunConfig, stage: Stage, state: RunState, gen: int) -> dict:
    """What the stage depends on: its config keys and its pins (fingerprinted together)."""
    return {**config_inputs(cfg, stage.keys(gen)), **stage.pins(state, gen)}


def plan_run(cfg: RunConfig, state: RunState, stages: dict[str, Stage]) -> Optional[tuple[int, str]]:
    """Check every finished stage before anything runs: refuse changed inputs (ConfigChanged); return the
    first finished stage whose recorded outputs are missing (it and everything after it must rerun)."""
    for gen in range(cfg.cycle.generations + 1):
        for name in stages_of(gen):
            entry = state.stage(gen, name)
            if entry.get("status") != "done":
                return None  # later stages depend on this one: nothing after it can be checked yet
            inputs = stage_inputs(cfg, stages[name], state, gen)
            if entry.get("fingerprint") != fingerprint(inputs):
                diff = changed_keys(entry.get("inputs", {}), inputs)
                raise ConfigChanged(
                    f"generation {gen} stage '{name}' finished with other inputs ({'; '.join(diff[:4])}"
                    f"{' ...' if len(diff) > 4 else ''}): keep the old config, or redo with --from {gen}:{name}"
                )
            gone = missing_outputs(cfg.run_dir, entry.get("outputs", {}))
            if gone:
                log.warning(
                    "generation %d stage '%s' is recorded as done but %s is missing: redoing it and every later stage",
                    gen,
                    name,
                    gone[0],
                )
                return gen, name
    return None


def run_cycle(
    cfg: RunConfig, redo_from: Optional[str] = None, progress: bool = True, stop_after: Optional[str] = None
) -> RunState:
    """Run (or resume) generation 0 and `cfg.cycle.generations` more. `stop_after='1:sft'` stops early."""
    from .clip.dist import refuse_controller_under_launcher

    refuse_controller_under_launcher()
    run_dir = Path(cfg.run_dir)
    redo = parse_stage_ref(redo_from, cfg.cycle.generations) if redo_from else None
    stop = parse_stage_ref(stop_after, cfg.cycle.generations, "--stop-after") if stop_after else None
    if cfg.cpu_threads > 0:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    stages = make_stages(cfg)
    with RunLock(run_dir) as lock:
        if lock.took_over_from:
            log.info("took over the stale lock of pid %s (it is no longer running)", lock.took_over_from.get("pid"))
        state = RunState(run_dir)
        store = store_of(cfg)
        if redo:
            forget_from(state, store, run_dir, stages, *redo)
        lost = plan_run(cfg, state, stages)
        if lost:
            forget_from(state, store, run_dir, stages, *lost)
        save_config(cfg, run_dir)  # only now: a refused run leaves the folder's config as it was
        best, since_best = None, 0
        for gen in range(cfg.cycle.generations + 1):
            for name in stages_of(gen):
                stage = stages[name]
                inputs = stage_inputs(cfg, stage, state, gen)
                fp = fingerprint(inputs)
                entry = state.stage(gen, name)
                if entry.get("status") == "done":
                    continue  # plan_run checked its fingerprint and outputs
                if entry.get("status") in ("running", "failed") and entry.get("fingerprint") != fp:
                    clear_stage(run_dir, store, stage, gen)  # partial work made with other inputs
                log.info("[gen %d] %s ...", gen, name)
                state.mark_running(gen, name, fp, inputs)
                try:
                    result = stage.run(
                        cfg, stage.pins(state, gen), gen_dir(run_dir, gen) / stage.folder, progress=progress
                    )
                except Exception as err:
                    state.mark_failed(
                        gen, name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    )
                    raise
                state.mark_done(gen, name, fp, result.outputs, result.metrics)
                free_accelerator_memory()  # the next stage loads another model onto the same GPU
                if stop == (gen, name):
                    return state
            store.compact()  # between generations, with no writer running; tagged versions stay
            metric = state.stage(gen, "eval").get("metrics", {}).get(cfg.cycle.early_stop_metric)
            if metric is not None and (best is None or metric > best):
                best, since_best = metric, 0
            elif metric is not None:
                since_best += 1
                if cfg.cycle.early_stop_patience and since_best >= cfg.cycle.early_stop_patience:
                    log.info(
                        "stopping early: %s has not improved for %d generation(s)",
                        cfg.cycle.early_stop_metric,
                        since_best,
                    )
                    break
        return state


def forget_from(state: RunState, store: Store, run_dir: Path, stages: dict[str, Stage], gen: int, name: str) -> None:
    dropped = state.forget_from(gen, ALL_STAGES, name)
    for ref in dropped:
        g, s = ref.split(":")
        clear_stage(run_dir, store, stages[s], int(g))
    log.info("redoing from %d:%s (%d finished stage(s) dropped)", gen, name, len(dropped))


def clear_stage(run_dir: Path, store: Store, stage: Stage, gen: int) -> None:
    """Remove what a stage wrote, so redoing it starts clean (its table rows of that generation too)."""
    out = gen_dir(run_dir, gen) / stage.folder
    if out.is_dir():
        shutil.rmtree(out)
    if stage.table_rows and store.has(stage.table_rows):
        store.delete(stage.table_rows, f"generation = {gen}", drop_tag=gen_tag(gen))
