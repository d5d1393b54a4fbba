"""The annotation pass of one generation: every training sample of a pinned `samples` version, once.

Resumable by construction: samples already in `annotations` for this generation are skipped, and rows
are written with insert-if-absent in batches, so a pass killed at any point and run again neither
duplicates nor loses a row. A sample whose output cannot be parsed is retried with sampling and another
seed, then kept as a failed row with its raw output and the reason (never dropped).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from ..errors import HQClipError
from ..files import write_text_atomic
from ..store import is_usable, sql_in
from .backends import Backend, FailedGeneration, make_backend
from .parse import ParseResult, parse_output
from .quality import annotation_quality
from .schema import FORMULA_KEYS, build_prompt, prompt_hash

SCAN_ROWS_MIN = 256  # samples read per store batch at least: small annotation batches still scan in bulk
TOP_REASONS = 10  # repairs and failures listed in the stats, most common first


class AnnotateError(HQClipError, ValueError):
    """An annotation pass that cannot run as asked (no samples, a generation begun by another annotator).

    Also a ValueError, so callers that caught the plain ValueError these used to be still do."""


def annotate_generation(
    cfg: Any,
    model_dir: Optional[str | Path],
    store,
    samples_version: int | str,
    generation: int,
    out_dir: str | Path,
    backend: Optional[Backend] = None,
    score_clip: Optional[str | Path] = None,
    progress: bool = True,
    splits: Sequence[str] = ("train",),
    device: str = "auto",
    lora_dir: Optional[str | Path] = None,
) -> dict:
    """Annotate the samples of `splits` at `samples_version` into `annotations` (generation `generation`).

    `cfg` is an `AnnotateConfig` (checked by `cycle.config`); `backend` overrides the one it names (tests,
    the teacher). With `score_clip` (a CLIP checkpoint dir, CLIP_{g-1}) each row gets its desc-vs-neg_desc
    margin as `score`. `device` (the run's `device` setting) places the backend's model and the scorer.
    `lora_dir`: a LoRA adapter over `model_dir` (SFT's adapter-only output; transformers and vLLM).
    Returns the stats also written to `out_dir/stats.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = sql_in("split", splits)
    todo = store.ids("samples", where, version=samples_version)
    if not todo:
        raise AnnotateError(f"annotate: samples@{samples_version} has no rows in splits {list(splits)}")
    own_backend = backend is None
    backend = backend or make_backend(cfg, model_dir, out_dir, device=device, lora_dir=lora_dir)
    t0 = time.time()
    tokens0 = getattr(backend, "generated_tokens", None)
    try:
        gen_where = f"generation = {int(generation)}"
        _check_annotator(store, gen_where, generation, backend.fingerprint)
        done = store.ids("annotations", gen_where)
        todo -= done
        scorer = None
        if score_clip and todo:
            from .score import ClipScorer

            scorer = ClipScorer(score_clip, device=device)
        written = _annotate(cfg, backend, store, samples_version, where, todo, generation, scorer, progress)
    finally:
        if own_backend:
            backend.close()
    seconds = time.time() - t0
    stats = generation_stats(store, generation)
    stats.update(
        samples_version=samples_version,
        splits=list(splits),
        annotator=backend.fingerprint,
        prompt_hash=prompt_hash(),
        scored_with=str(score_clip) if score_clip else None,
        this_run={
            "written": written,
            "already_done": len(done),
            "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 2) if seconds > 0 else None,
            "generated_tokens": None if tokens0 is None else backend.generated_tokens - tokens0,
        },
    )
    quality = annotation_quality(store, samples_version, generation, splits)
    if quality is not None:
        stats["quality"] = quality
    write_text_atomic(out_dir / "stats.json", json.dumps(stats, indent=2, default=str))
    return stats


def _check_annotator(store, gen_where: str, generation: int, fingerprint: str) -> None:
    """A resumed pass must use the annotator that began it, or the generation would mix two models."""
    if not store.has("annotations"):
        return
    found = set(store.read("annotations", ["annotator"], gen_where).column("annotator").to_pylist())
    others = found - {fingerprint}
    if others:
        raise AnnotateError(
            f"annotations of generation {generation} were begun by annotator {sorted(others)[0]}, "
            f"this pass uses {fingerprint}: finish with the same model, or delete that "
            "generation's annotations first"
        )


def _annotate(
    cfg, backend, store, samples_version, where, todo: set[str], generation: int, scorer, progress: bool
) -> int:
    written, pending, batch = 0, [], []
    bar = tqdm(total=len(todo), desc=f"annotate gen {generation}", unit="img", disable=not progress, dynamic_ncols=True)

    def flush():
        nonlocal written, pending
        if pending:
            written += store.insert_new("annotations", pending)
            pending = []

    def run_batch():
        nonlocal batch
        rows = annotate_batch(backend, batch, cfg, generation, scorer)
        pending.extend(rows)
        bar.update(len(rows))
        counts = Counter(r["status"] for r in pending)
        bar.set_postfix(failed=counts.get("failed", 0), refresh=False)
        batch = []
        if len(pending) >= cfg.write_batch:
            flush()

    try:
        for rb in store.scan(
            "samples",
            ["id", "image", "alt_text"],
            where,
            version=samples_version,
            batch_size=max(cfg.batch_size, SCAN_ROWS_MIN),
        ):
            for row in rb.to_pylist():
                if row["id"] in todo:
                    batch.append(row)
                    if len(batch) >= cfg.batch_size:
                        run_batch()
        if batch:
            run_batch()
        flush()
    finally:
        bar.close()
    return written


def generate_with_retries(
    backend: Backend, items: list, keys: list[str], cfg: Any
) -> tuple[list, list[ParseResult], list[int]]:
    """Generate, parse, and retry the unusable outputs `cfg.retries` times with another seed (sampling).

    Returns the raw outputs, their parse results and the attempts each took. A backend failure marked
    not retryable (e.g. an image that cannot be read) is not asked again.
    """
    raws = list(backend.generate(items, keys=keys))
    results: list[ParseResult] = [_parse(o) for o in raws]
    attempts = [1] * len(items)
    for attempt in range(1, cfg.retries + 1):
        again = [
            i
            for i, (r, o) in enumerate(zip(results, raws))
            if not r.usable and not (isinstance(o, FailedGeneration) and not o.retryable)
        ]
        if not again:
            break
        temperature = cfg.temperature if cfg.temperature > 0 else cfg.retry_temperature
        retry = backend.generate(
            [items[i] for i in again], seed=attempt, temperature=temperature, keys=[keys[i] for i in again]
        )
        for i, out in zip(again, retry):
            attempts[i] += 1
            raws[i], results[i] = out, _parse(out)
    return raws, results, attempts


def annotate_batch(backend: Backend, samples: list[dict], cfg: Any, generation: int, scorer=None) -> list[dict]:
    """Annotation rows for `samples` (dicts with id, image, alt_text), retries included."""
    items = [(s["image"], build_prompt(s["alt_text"])) for s in samples]
    raws, results, attempts = generate_with_retries(backend, items, [s["id"] for s in samples], cfg)
    scores = (
        scorer.score([s["image"] for s in samples], [r.record for r in results]) if scorer else [None] * len(samples)
    )
    fingerprint, ph = backend.fingerprint, prompt_hash()
    rows = []
    for s, res, raw, n, score in zip(samples, results, raws, attempts, scores):
        row = {
            "id": s["id"],
            "generation": int(generation),
            "raw_output": str(raw),
            "status": res.status,
            "reason": res.reason if res.status != "failed" or n == 1 else f"{res.reason} ({n} attempts)",
            "attempts": n,
            "annotator": fingerprint,
            "prompt_hash": ph,
            "score": score,
        }
        for key in FORMULA_KEYS:
            row[key] = res.record[key] if res.record else None
        rows.append(row)
    return rows


def _parse(output: str) -> ParseResult:
    if isinstance(output, FailedGeneration):
        return ParseResult(None, "failed", f"backend: {output.reason}")
    return parse_output(output)


def generation_stats(store, generation: int) -> dict:
    """Counts by status, parse rate, lengths and scores over all rows of `generation` in the store."""
    cols = ["status", "reason", "desc", "neg_desc", "tags", "neg_tags", "attempts", "score"]
    rows = store.read("annotations", cols, f"generation = {int(generation)}").to_pylist()
    n = len(rows)
    status = Counter(r["status"] for r in rows)
    usable = [r for r in rows if is_usable(r["status"])]
    sentences = [s for r in usable for s in r["desc"]]
    tags = [t for r in usable for t in r["tags"]]
    pairs = [
        (p, q) for r in usable for k, nk in (("desc", "neg_desc"), ("tags", "neg_tags")) for p, q in zip(r[k], r[nk])
    ]
    scores = [r["score"] for r in rows if r["score"] is not None]
    repairs = Counter(
        part.split(":")[0].strip()
        for r in rows
        if r["status"] == "repaired"
        for part in (r["reason"] or "").split("; ")
    )
    failures = Counter((r["reason"] or "").split(" (")[0] for r in rows if r["status"] == "failed")

    def mean(xs):
        return round(sum(xs) / len(xs), 4) if xs else None

    return {
        "generation": int(generation),
        "rows": n,
        "by_status": dict(status),
        "parse_rate": round(len(usable) / n, 4) if n else None,
        "ok_rate": round(status.get("ok", 0) / n, 4) if n else None,
        "mean_attempts": mean([r["attempts"] for r in rows]),
        "sentences_per_image": mean([len(r["desc"]) for r in usable]),
        "words_per_sentence": mean([len(s.split()) for s in sentences]),
        "tags_per_image": mean([len(r["tags"]) for r in usable]),
        "words_per_tag": mean([len(t.split()) for t in tags]),
        "identical_negative_share": mean([float(p.strip().lower() == q.strip().lower()) for p, q in pairs]),
        "score_mean": mean(scores),
        "score_positive_share": mean([float(s > 0) for s in scores]),
        "repairs": dict(repairs.most_common(TOP_REASONS)),
        "failures": dict(failures.most_common(TOP_REASONS)),
    }
