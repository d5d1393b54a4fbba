"""`hqclip doctor RUN`: check a run's record against what is on disk, and rebuild a lost or corrupt one.

The record (`state.json`) says which stages are done, with their outputs and fingerprints. The doctor
checks that every done stage's outputs still exist and its fingerprint matches the run's `config.yaml`.
With `repair`, a missing or unreadable record is rebuilt from the tables' generation tags and the stages'
folders (each stage knows what it leaves on disk: `Stage.recover`), in order, up to the first stage whose
outputs are not all there; the run then resumes from that stage.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import fingerprint, load_config
from .controller import stage_inputs
from .errors import HQClipError
from .pipeline import make_stages, stages_of
from .state import RunLock, RunState, StateError, gen_dir, missing_outputs


def run_config_of(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HQClipError(f"{run_dir} has no config.yaml: not a run folder (start one with `hqclip run CONFIG`)")
    return load_config(path, [f"root={run_dir.parent}", f"name={run_dir.name}"])


def record_is_lost(run_dir: str | Path) -> bool:
    """state.json is missing or cannot be read (what `rebuild` is for)."""
    try:
        return not RunState(run_dir).path.is_file()
    except StateError:
        return True


def check(run_dir: str | Path) -> tuple[list[str], bool]:
    """(findings, healthy): one line per problem of the record against the disk and the config."""
    run_dir = Path(run_dir)
    cfg = run_config_of(run_dir)
    try:
        state = RunState(run_dir)
    except StateError as err:
        return [str(err)], False
    if not state.path.exists():
        return [f"{state.path} is missing: `hqclip doctor {run_dir} --repair` rebuilds it"], False
    stages, problems = make_stages(cfg), []
    for gen in range(cfg.cycle.generations + 1):
        for name in stages_of(gen):
            entry = state.stage(gen, name)
            if entry.get("status") != "done":
                return problems, not problems
            gone = missing_outputs(run_dir, entry.get("outputs", {}))
            if gone:
                problems.append(
                    f"generation {gen} stage '{name}' is done but {gone[0]} is missing: "
                    f"`hqclip run` redoes it and every later stage"
                )
            elif entry.get("fingerprint") != fingerprint(stage_inputs(cfg, stages[name], state, gen)):
                problems.append(
                    f"generation {gen} stage '{name}' was run with other inputs than config.yaml "
                    f"says: redo with --from {gen}:{name}"
                )
    return problems, not problems


def rebuild(run_dir: str | Path) -> tuple[RunState, str | None]:
    """A new record from the disk: every stage whose outputs are all there, in order. Returns the record
    (saved; an unreadable old one is kept beside it) and the first stage to run ('G:S'), or None."""
    run_dir = Path(run_dir)
    cfg = run_config_of(run_dir)
    with RunLock(run_dir):  # no controller may write the record meanwhile
        return _rebuild(run_dir, cfg)


def _rebuild(run_dir: Path, cfg) -> tuple[RunState, str | None]:
    stages = make_stages(cfg)
    state = RunState(run_dir, data={"generations": {}, "rebuilt": time.strftime("%Y-%m-%d %H:%M:%S")})
    resume = None
    for gen in range(cfg.cycle.generations + 1):
        for name in stages_of(gen):
            stage = stages[name]
            result = stage.recover(cfg, stage.pins(state, gen), gen_dir(run_dir, gen) / stage.folder)
            if result is None or missing_outputs(run_dir, result.outputs):
                resume = f"{gen}:{name}"
                break
            inputs = stage_inputs(cfg, stage, state, gen)
            state.data["generations"].setdefault(str(gen), {})[name] = {
                "status": "done",
                "fingerprint": fingerprint(inputs),
                "inputs": inputs,
                "outputs": result.outputs,
                "metrics": result.metrics,
                "recovered": True,
            }
        if resume:
            break
    if state.path.exists():
        state.path.replace(state.path.with_name(f"state.json.broken-{int(time.time())}"))
    state.save()
    return state, resume
