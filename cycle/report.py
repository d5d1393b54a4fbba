"""`hqclip report RUN`: one static HTML page (opens from disk, no server) with PNG plots beside it.

Metrics of every generation as a table and a plot, CLIP loss curves, annotation statistics, and a
gallery of images with their alt-text and each generation's four formulas.

Everything from the run (ids, alt-text, model output, state.json) is data: it reaches the page only through
`_esc` (html.escape, quotes included) inside double-quoted attributes or text, and gallery files are named
by `safe_name(id)`, never by the id itself.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .data.images import image_ext  # noqa: E402
from .files import read_json, safe_name, write_text_atomic  # noqa: E402
from .state import RunState, flat_numbers, gen_dir  # noqa: E402
from .status import KEY_METRICS, samples_across_generations  # noqa: E402
from .store import Store  # noqa: E402

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img.plot{max-width:560px;margin:0.5em}
.card{display:flex;gap:1em;border:1px solid #ddd;border-radius:6px;padding:0.8em;margin:0.8em 0}
.card img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #eee}
.card td{text-align:left;vertical-align:top;font-size:0.9em}.neg{color:#a33}.muted{color:#777}
"""


# What tells whether the annotator beat the alt-text it was given; the rest goes under "all".
ANNOTATION_KEYS = [
    "rows",
    "parse_rate",
    "ok_rate",
    "quality/schema_valid_share",
    "quality/annotation/f1",
    "quality/alt_text/f1",
    "quality/f1_gain_over_alt_text",
    "quality/unseen/annotation_f1",
    "quality/unseen/alt_text_f1",
    "quality/neg_desc_false_share",
    "score_mean",
    "this_run/rows_per_s",
]


def _metric_rows(state: RunState) -> tuple[list[int], list[str], dict]:
    gens = [g for g in state.generations if state.stage(g, "eval").get("metrics")]
    metrics = {g: state.stage(g, "eval")["metrics"] for g in gens}
    names = sorted({k for m in metrics.values() for k, v in m.items() if isinstance(v, (int, float))})
    return gens, names, metrics


def plot_metrics(state: RunState, out: Path) -> Path | None:
    gens, names, metrics = _metric_rows(state)
    if not gens:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, key in KEY_METRICS.items():
        if key in names:
            ax.plot(gens, [metrics[g].get(key) for g in gens], marker="o", label=label)
    ax.set_xticks(gens)
    return _save(fig, ax, out, "generation", "held-out metric", "CLIP_g on held-out sets")


def _save(fig, ax, out: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_losses(run_dir: Path, state: RunState, out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for gen in state.generations:
        log = Path(state.outputs(gen, "train").get("log", gen_dir(run_dir, gen) / "clip" / "log.jsonl"))
        if not log.exists():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "step" in r and "clip_loss" in r]
        if rows:  # the CLIP term compares across generations; the other terms exist from gen 1 on
            (line,) = ax.plot([r["step"] for r in rows], [r["clip_loss"] for r in rows], label=f"gen {gen} clip")
            if any("hni_loss" in r or "stc_loss" in r for r in rows):
                ax.plot(
                    [r["step"] for r in rows],
                    [r["loss"] for r in rows],
                    ls="--",
                    color=line.get_color(),
                    label=f"gen {gen} total",
                )
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, ax, out, "step", "loss", "CLIP training loss")


def _annotation_stats(state: RunState) -> dict[int, dict]:
    out = {}
    for gen in state.generations:
        path = state.outputs(gen, "annotate").get("stats")
        if path and Path(path).exists():
            out[gen] = read_json(path)
    return out


def _esc(value) -> str:
    """Any value as HTML text or a double-quoted attribute value (quotes escaped too)."""
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: list[str], rows: list[list], left: int = 1) -> str:
    def cell(tag, value, i):
        cls = ' class="l"' if i < left else ""
        text = f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))
        return f"<{tag}{cls}>{_esc(text)}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _formulas(rec: dict | None) -> str:
    if not rec:
        return '<span class="muted">none</span>'
    status = rec.get("status")
    parts = []
    if status and status != "ok":
        parts.append(f'<span class="muted">[{_esc(status)}: {_esc(rec.get("reason") or "")}]</span>')
    parts.append(_esc(" ".join(map(str, rec.get("desc") or []))))
    parts.append('<span class="neg">' + _esc(" ".join(map(str, rec.get("neg_desc") or []))) + "</span>")
    parts.append("tags: " + _esc(", ".join(map(str, rec.get("tags") or []))))
    parts.append('<span class="neg">neg: ' + _esc(", ".join(map(str, rec.get("neg_tags") or []))) + "</span>")
    return "<br>".join(parts)


def write_report(run_dir: str | Path, store: Store, gallery: int = 12, seed: int = 0) -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    (out / "img").mkdir(parents=True, exist_ok=True)
    state = RunState(run_dir)
    parts = [
        f'<!doctype html><html><head><meta charset="utf-8"><title>HQ-CLIP run {_esc(run_dir.name)}'
        f"</title><style>{CSS}</style></head><body><h1>HQ-CLIP cycle: run {_esc(run_dir.name)}</h1>"
    ]

    gens, names, metrics = _metric_rows(state)
    parts.append("<h2>Held-out metrics per generation</h2>")
    if gens:
        keys = [(label, key) for label, key in KEY_METRICS.items() if key in names]
        parts.append(
            _table(
                ["metric"] + [f"gen {g}" for g in gens],
                [[f"{label} ({key})"] + [metrics[g].get(key) for g in gens] for label, key in keys],
            )
        )
        parts.append(
            "<details><summary>all metrics</summary>"
            + _table(["metric"] + [f"gen {g}" for g in gens], [[n] + [metrics[g].get(n) for g in gens] for n in names])
            + "</details>"
        )
    else:
        parts.append('<p class="muted">no generation evaluated yet</p>')
    plots = [
        name
        for name, fn in (
            ("metrics.png", lambda p: plot_metrics(state, p)),
            ("loss.png", lambda p: plot_losses(run_dir, state, p)),
        )
        if fn(out / name)
    ]
    parts.append("<div>" + "".join(f'<img class="plot" src="{_esc(n)}" alt="{_esc(n)}">' for n in plots) + "</div>")

    stats = _annotation_stats(state)
    if stats:
        flat = {g: flat_numbers(s) for g, s in stats.items()}
        keys = sorted({k for f in flat.values() for k in f})
        parts.append("<h2>Annotation statistics</h2>")
        main_keys = [k for k in ANNOTATION_KEYS if k in keys]
        parts.append(
            _table(
                ["statistic"] + [f"gen {g}" for g in flat], [[k] + [flat[g].get(k) for g in flat] for k in main_keys]
            )
        )
        parts.append(
            "<details><summary>all annotation statistics</summary>"
            + _table(["statistic"] + [f"gen {g}" for g in flat], [[k] + [flat[g].get(k) for g in flat] for k in keys])
            + "</details>"
        )

    stage_rows = []
    for g in state.generations:
        for stage, entry in state.data["generations"][str(g)].items():
            stage_rows.append([f"{g}:{stage}", entry.get("status"), entry.get("duration_s"), entry.get("fingerprint")])
    parts.append("<h2>Stages</h2>" + _table(["stage", "status", "seconds", "inputs fingerprint"], stage_rows, left=2))

    if state.is_done(0, "data"):
        rows = samples_across_generations(store, state, sample=gallery, where="split = 'train'", seed=seed)
        parts.append(f"<h2>Gallery ({len(rows)} training images)</h2>")
        for r in rows:
            name = "img/" + safe_name(r["id"], image_ext(r["image"]))
            (out / name).write_bytes(r["image"])
            cells = [f"<tr><td><b>alt-text</b></td><td>{_esc(r['alt_text'])}</td></tr>"]
            meta = r.get("meta")
            if isinstance(meta, dict) and meta.get("clean"):
                cells.append(f"<tr><td><b>truth</b></td><td>{_esc(meta['clean'])}</td></tr>")
            if r.get("teacher"):
                cells.append(f"<tr><td><b>teacher</b></td><td>{_formulas(r['teacher'])}</td></tr>")
            for key in sorted(k for k in r if k.startswith("gen-")):
                cells.append(f"<tr><td><b>{_esc(key)}</b></td><td>{_formulas(r[key])}</td></tr>")
            parts.append(
                f'<div class="card"><img src="{_esc(name)}" alt="{_esc(r["id"])}">'
                f"<div><b>{_esc(r['id'])}</b><table>{''.join(cells)}</table></div></div>"
            )
    # Lets a headless browser (and a curious reader) see that every picture loaded.
    parts.append(
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.images=i.length;"
        "document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>"
    )
    parts.append("</body></html>")
    page = out / "index.html"
    write_text_atomic(page, "\n".join(parts))
    return page
