"""A variant of the demo from generation G on, paired by seed with the runs of `benchmarks/demo_seeds.py`.

    python benchmarks/demo_variant.py --label carry --from-gen 2 [--stage lvlm] [--stop-after G:STAGE]
                                      [--seeds 0,1,2] [--parallel 3] [--root DIR] [--report-only]
                                      [--base LABEL] key=value ...

For each seed, waits until the base run `<root>/demo-seed-S` has finished generation G-1, copies what
generations < G made (their state, the store, their folders) to `<root>/demo-seed-S-<label>` and runs
`hqclip run configs/emoji.yaml` there with the overrides: generations < G are reused as they are (their
inputs are unchanged; an override that changes them is refused by the controller), generation G on runs the
variant. With `--stage S` other than generation G's first stage (e.g. `--from-gen 1 --stage train`: a loss
ablation on generation 1's own annotations), it waits for generation G, copies it too and redoes from G:S.
With `--base LABEL` the fork's source (and what it is compared with) is the variant `demo-seed-S-LABEL`
instead of the demo run: a variant of the shipped config where that config is itself a variant.
Then waits for the base runs to finish and writes `benchmarks/results/variant_<label>.md`: for each
generation >= G, variant vs base per metric, paired by seed (`val` is the selection split; the held-out
splits are reported, never tuned on), and the annotator's fact-F1 on images never used in SFT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the checkout's own `cycle`
from demo_seeds import METRICS, OUT, REPO, paired  # noqa: E402
from tune_loss_val import stc_fall  # noqa: E402

from cycle.store import Store  # noqa: E402

ANNOTATOR = {
    "annotator fact-F1, images not in SFT": "quality/unseen/annotation_f1",
    "alt-text fact-F1, images not in SFT": "quality/unseen/alt_text_f1",
    "annotator fact-F1, all training images": "quality/annotation/f1",
}


def state_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def done(run_dir: Path, gen: int) -> bool:
    path = run_dir / "state.json"
    return path.exists() and state_of(run_dir)["generations"].get(str(gen), {}).get("eval", {}).get("status") == "done"


def wait_for(run_dir: Path, gen: int) -> None:
    while not done(run_dir, gen):
        time.sleep(20)


def fork(base: Path, target: Path, from_gen: int) -> None:
    """Copy what generations < `from_gen` of `base` made to `target` (a started variant is kept: resume).
    The base run may go on meanwhile, so rows and tags that generations >= `from_gen` wrote to the copied
    store are deleted (a later seed's fork, with fewer parallel slots than seeds, found the base's next annotations
    there: a different annotator, refused by the variant's annotate stage)."""
    if (target / "state.json").exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    keep = lambda name: not name.startswith("gen-") or int(name[4:]) < from_gen  # noqa: E731
    tmp.mkdir(parents=True)
    for item in base.iterdir():
        if item.name in ("state.json", ".lock", "config.yaml") or not keep(item.name):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    state = state_of(base)
    state["generations"] = {g: v for g, v in state["generations"].items() if int(g) < from_gen}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    store = Store(tmp / "lance")
    if store.has("annotations"):
        store.table("annotations").delete(f"generation >= {int(from_gen)}")
    for name in store.names():
        if name.startswith("annotations_staging_"):
            store.db.drop_table(name)
            continue
        for tag in store.tags(name):  # the base's tags of those generations
            if tag.startswith("gen-") and int(tag[4:]) >= from_gen:
                store.table(name).tags.delete(tag)
    tmp.rename(target)


def run_dir(root: Path, seed: int, label: str = "") -> Path:
    """The demo run of `seed` (`label` empty) or its variant `label`."""
    return root / (f"demo-seed-{seed}-{label}" if label else f"demo-seed-{seed}")


def run_variant(
    seed: int,
    root: Path,
    label: str,
    from_gen: int,
    overrides: list[str],
    stage: str,
    stop_after: str,
    base_label: str = "",
) -> dict:
    base, name = run_dir(root, seed, base_label), f"demo-seed-{seed}-{label}"
    first = stage == ("data" if from_gen == 0 else "lm" if from_gen == 1 else "lvlm")
    wait_for(base, from_gen - 1 if first else from_gen)
    fork(base, root / name, from_gen if first else from_gen + 1)
    cmd = [sys.executable, "-m", "cycle.cli", "run", str(REPO / "configs" / "emoji.yaml"), f"root={root}"]
    cmd += [f"name={name}", f"seed={seed}", f"train.seed={seed}", "cpu_threads=1", *overrides]
    cmd += ([] if first else ["--from", f"{from_gen}:{stage}"]) + (["--stop-after", stop_after] if stop_after else [])
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    return {"seed": seed, "wall_s": time.time() - start}


def report(
    root: Path,
    label: str,
    seeds: list[int],
    from_gen: int,
    overrides: list[str],
    walls: dict,
    flags: str = "",
    against: str = "",
    against_gen: int | None = None,
) -> str:
    """Variant vs base, paired by seed; `against` names another variant to compare with instead, and
    `against_gen` one generation of it to compare every variant generation with (e.g. an epoch-matched control)."""
    base_of = lambda s: run_dir(root, s, against)  # noqa: E731
    bg = lambda g: str(g if against_gen is None else against_gen)  # noqa: E731  the base's generation
    bases = [state_of(base_of(s))["generations"] for s in seeds]
    variants = [state_of(root / f"demo-seed-{s}-{label}")["generations"] for s in seeds]
    gens = sorted(int(g) for g in variants[0] if int(g) >= from_gen)
    lines = [
        f"# Demo variant `{label}` from generation {from_gen}, paired with "
        + (f"variant `{against}`" if against else "the demo runs")
        + (f", generation {against_gen}" if against_gen is not None else ""),
        "",
        f"`python benchmarks/demo_variant.py --label {label} --from-gen {from_gen} {flags}--seeds "
        f"{','.join(map(str, seeds))} {' '.join(overrides)}`: generations < {from_gen} are the demo runs' own "
        "(copied; with --stage, generation G's stages before it too), so each pair shares everything up to "
        "there. Cells: variant vs base (mean over seeds): "
        "mean ± std of the paired difference (seeds up +, down -). `val` is the selection split.",
        "",
        "| metric | "
        + " | ".join(f"gen {g}" + ("" if against_gen is None else f" vs gen {against_gen}") for g in gens)
        + " |",
        "|---|" + "---|" * len(gens),
    ]
    val_extra = {"val negative discrimination acc. (selection split)": "val/acc", "val tag mAP": "val/tag_map"}
    rows = [(k, "eval", v) for k, v in {**METRICS, **val_extra}.items()]
    rows += [(k, "annotate", v) for k, v in ANNOTATOR.items()]
    for label_, stage, key in rows:
        cells = []
        for g in gens:
            b = [s[bg(g)][stage]["metrics"].get(key) for s in bases]
            v = [s[str(g)][stage]["metrics"].get(key) for s in variants]
            cells.append(paired(b, v) if None not in b + v else "")
        lines.append(f"| {label_} | " + " | ".join(cells) + " |")
    for by_epoch, what in ((False, "first to last logged step"), (True, "first to last epoch's mean")):
        cells = []  # the STC term's fall over each generation's training
        for g in gens:
            logs = [(base_of(s), root / f"demo-seed-{s}-{label}") for s in seeds]
            b = [stc_fall(d / f"gen-{int(bg(g)):03d}" / "clip" / "log.jsonl", by_epoch) for d, _ in logs]
            v = [stc_fall(d / f"gen-{g:03d}" / "clip" / "log.jsonl", by_epoch) for _, d in logs]
            cells.append(paired(b, v) if None not in b + v else "")
        lines.append(f"| STC term's fall in training ({what}) | " + " | ".join(cells) + " |")
    stage_s = {
        st: statistics.mean(v[str(g)][st].get("duration_s", 0.0) for v in variants for g in gens)
        for st in ("align", "sft", "train")
    }
    base_s = {
        st: statistics.mean(b[bg(g)][st].get("duration_s", 0.0) for b in bases for g in gens)
        for st in ("align", "sft", "train")
    }
    lines += [
        "",
        "Stage seconds per generation (mean; contended cores, several runs at once): "
        + ", ".join(f"{st} {stage_s[st]:.0f} s vs {base_s[st]:.0f} s" for st in stage_s)
        + ". Variant wall time from the fork: "
        + ", ".join(f"seed {s} {walls[s] / 60:.1f} min" for s in seeds if s in walls)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--from-gen", type=int, default=2)
    ap.add_argument("--stage", default="lvlm", help="the stage of generation --from-gen the variant starts at")
    ap.add_argument("--stop-after", default="", metavar="GEN:STAGE")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--root", default=str(REPO / "generations"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--against", default="", help="with --report-only: compare with this variant, not the base")
    ap.add_argument("--against-gen", type=int, help="with --against: compare with this generation of it")
    ap.add_argument("--base", default="", help="fork from the runs of this variant (and compare with them)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root, seeds = Path(args.root), [int(s) for s in args.seeds.split(",")]
    walls_path = OUT / f"variant_{args.label}.json"
    if args.report_only:
        kept = json.loads(walls_path.read_text())
        walls = {int(k): v for k, v in kept["wall_s"].items()}
        args.overrides = args.overrides or kept.get("overrides", [])  # the run's own, for the report's header
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(
                pool.map(
                    lambda s: run_variant(
                        s, root, args.label, args.from_gen, args.overrides, args.stage, args.stop_after, args.base
                    ),
                    seeds,
                )
            )
        walls = {r["seed"]: r["wall_s"] for r in results}
        walls_path.write_text(json.dumps({"overrides": args.overrides, "wall_s": walls}, indent=1))
    last = max(int(g) for g in state_of(root / f"demo-seed-{seeds[0]}-{args.label}")["generations"])
    against = args.against or args.base
    for s in seeds:
        wait_for(run_dir(root, s, against), last)
    flags = (f"--stage {args.stage} " if args.stage != "lvlm" else "") + (
        f"--stop-after {args.stop_after} " if args.stop_after else ""
    )
    flags += f"--base {args.base} " if args.base else ""
    text = report(root, args.label, seeds, args.from_gen, args.overrides, walls, flags, against, args.against_gen)
    name = f"variant_{args.label}" + (f"_vs_{args.against}" if args.against else "")
    name += f"_gen{args.against_gen}" if args.against_gen is not None else ""
    (OUT / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
