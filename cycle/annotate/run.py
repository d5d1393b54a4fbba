"""The annotation pass of one generation: every training sample of a pinned `samples` version, once.

Resumable by construction: samples already in `annotations` for this generation are skipped (looked up
batch by batch as the samples are scanned: no set of ids is held), and rows are written with
insert-if-absent in batches, so a pass killed at any point and run again neither duplicates nor loses a
row. A sample whose output cannot be parsed is retried with sampling and another seed, then kept as a
failed row with its raw output and the reason (never dropped). With `cluster.executor: ray` the pass runs
on Ray Data instead (`ray_run`: shards, staging, one merge); this module then only adds the stats.
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
from ..store import PRESENT_LOOKUP_CHUNK, is_usable, sql_in
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
    cluster: Any = None,
) -> dict:
    """Annotate the samples of `splits` at `samples_version` into `annotations` (generation `generation`).

    `cfg` is an `AnnotateConfig` (checked by `cycle.config`); `backend` overrides the one it names (tests,
    the teacher). With `score_clip` (a CLIP checkpoint dir, CLIP_{g-1}) each row gets its desc-vs-neg_desc
    margin as `score`. `device` (the run's `device` setting) places the backend's model and the scorer.
    `lora_dir`: a LoRA adapter over `model_dir` (SFT's adapter-only output; transformers and vLLM).
    `cluster` (a `ClusterConfig`) with `executor: ray` runs the pass on Ray (`ray_run`); otherwise here.
    Returns the stats also written to `out_dir/stats.json`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = sql_in("split", splits)
    gen_where = f"generation = {int(generation)}"
    total = store.count("samples", where, version=samples_version)
    if not total:
        raise AnnotateError(f"annotate: samples@{samples_version} has no rows in splits {list(splits)}")
    on_ray = backend is None and cluster is not None and cluster.executor == "ray"
    if on_ray:
        from .ray_run import annotate_on_ray

        def check_annotator(fingerprint: str, staged: Sequence[str] = ()) -> None:
            _check_annotator(store, gen_where, generation, fingerprint)
            for began in staged:
                _same_annotator(generation, began, fingerprint)

        this_run = annotate_on_ray(
            cfg,
            cluster,
            model_dir,
            store,
            samples_version,
            generation,
            where,
            out_dir,
            check_annotator,
            score_clip=score_clip,
            device=device,
            lora_dir=lora_dir,
            progress=progress,
        )
        first = next(store.scan("annotations", ["annotator"], gen_where, batch_size=1), None)  # one row, not the column
        fingerprint = first.column("annotator")[0].as_py() if first is not None and first.num_rows else None
    else:
        this_run, fingerprint = _annotate_here(
            cfg,
            store,
            samples_version=samples_version,
            generation=generation,
            where=where,
            total=total,
            model_dir=model_dir,
            out_dir=out_dir,
            backend=backend,
            score_clip=score_clip,
            device=device,
            lora_dir=lora_dir,
            progress=progress,
        )
    stats = generation_stats(store, generation)
    stats.update(
        samples_version=samples_version,
        splits=list(splits),
        annotator=fingerprint,
        prompt_hash=prompt_hash(),
        scored_with=str(score_clip) if score_clip else None,
        this_run=this_run,
    )
    quality = annotation_quality(store, samples_version, generation, splits)
    if quality is not None:
        stats["quality"] = quality
    write_text_atomic(out_dir / "stats.json", json.dumps(stats, indent=2, default=str))
    return stats


def _annotate_here(
    cfg,
    store,
    *,
    samples_version,
    generation: int,
    where: str,
    total: int,
    model_dir,
    out_dir: Path,
    backend,
    score_clip,
    device,
    lora_dir,
    progress: bool,
) -> tuple[dict, str]:
    """The pass in this process (`executor: local`, or a given backend). Returns (this_run, fingerprint)."""
    from .shards import merge_leftover_staging

    gen_where = f"generation = {int(generation)}"
    own_backend = backend is None
    backend = backend or make_backend(cfg, model_dir, out_dir, device=device, lora_dir=lora_dir)
    t0 = time.time()
    tokens0 = getattr(backend, "generated_tokens", None)
    try:
        _check_annotator(store, gen_where, generation, backend.fingerprint)
        # a pass begun on Ray and ended here: its finished shards count
        merge_leftover_staging(
            store,
            generation,
            samples_version,
            where,
            lambda staged: _same_annotator(generation, staged, backend.fingerprint),
        )
        done = store.count("annotations", gen_where) if store.has("annotations") else 0
        if done:  # a resumed pass looks each scan batch's ids up in the table: through its key index at scale
            store.index_keys("annotations")
        todo = max(total - done, 0)
        scorer = None
        if score_clip and todo:
            from .score import ClipScorer

            scorer = ClipScorer(score_clip, device=device)
        written = _annotate(cfg, backend, store, samples_version, where, todo, done > 0, generation, scorer, progress)
    finally:
        if own_backend:
            backend.close()
    seconds = time.time() - t0
    return {
        "written": written,
        "already_done": done,
        "seconds": round(seconds, 2),
        "rows_per_s": round(written / seconds, 2) if seconds > 0 else None,
        "generated_tokens": None if tokens0 is None else backend.generated_tokens - tokens0,
    }, backend.fingerprint


def _check_annotator(store, gen_where: str, generation: int, fingerprint: str) -> None:
    """A resumed pass must use the annotator that began it, or the generation would mix two models."""
    if store.has("annotations"):
        found = store.read("annotations", ["annotator"], gen_where).column("annotator").unique().to_pylist()
        for began in found:
            _same_annotator(generation, began, fingerprint)


def _same_annotator(generation: int, began: str, fingerprint: str) -> None:
    if began != fingerprint:
        raise AnnotateError(
            f"annotations of generation {generation} were begun by annotator {began}, "
            f"this pass uses {fingerprint}: finish with the same model, or delete that "
            "generation's annotations first"
        )


def _not_yet_annotated(store, rows: list[dict], gen_where: str) -> list[dict]:
    """The rows of one scan batch whose id has no annotation of the generation yet: an anti-join batch by
    batch, looked up by the batch's own ids (`PRESENT_LOOKUP_CHUNK` per filter), never a whole-table set."""
    ids = [r["id"] for r in rows]
    present: set[str] = set()
    for start in range(0, len(ids), PRESENT_LOOKUP_CHUNK):
        found = store.read(
            "annotations", ["id"], f"{gen_where} AND {sql_in('id', ids[start : start + PRESENT_LOOKUP_CHUNK])}"
        )
        present.update(found.column("id").to_pylist())
    return [r for r in rows if r["id"] not in present] if present else rows


def _annotate(
    cfg, backend, store, samples_version, where, todo: int, resumed: bool, generation: int, scorer, progress: bool
) -> int:
    written, pending, batch = 0, [], []
    gen_where = f"generation = {int(generation)}"
    bar = tqdm(total=todo, desc=f"annotate gen {generation}", unit="img", disable=not progress, dynamic_ncols=True)

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
            rows = rb.to_pylist()
            # a fresh pass looks nothing up; a resumed one skips what an earlier run wrote
            for row in _not_yet_annotated(store, rows, gen_where) if resumed else rows:
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


STATS_SCAN_ROWS = 4096  # annotation rows per batch while the stats are counted


def generation_stats(store, generation: int) -> dict:
    """Counts by status, parse rate, lengths and scores over all rows of `generation` in the store, summed
    over scan batches (running totals: no row is kept)."""
    cols = ["status", "reason", "desc", "neg_desc", "tags", "neg_tags", "attempts", "score"]
    status, repairs, failures = Counter(), Counter(), Counter()
    sums = Counter()  # running totals of the means below

    for rb in store.scan("annotations", cols, f"generation = {int(generation)}", batch_size=STATS_SCAN_ROWS):
        for r in rb.to_pylist():
            status[r["status"]] += 1
            sums["attempts"] += r["attempts"]
            if r["score"] is not None:
                sums["scores"] += 1
                sums["score_sum"] += r["score"]
                sums["score_positive"] += r["score"] > 0
            if r["status"] == "repaired":
                repairs.update(part.split(":")[0].strip() for part in (r["reason"] or "").split("; "))
            elif r["status"] == "failed":
                failures[(r["reason"] or "").split(" (")[0]] += 1
            if not is_usable(r["status"]):
                continue
            sums["usable"] += 1
            sums["sentences"] += len(r["desc"])
            sums["sentence_words"] += sum(len(x.split()) for x in r["desc"])
            sums["tags"] += len(r["tags"])
            sums["tag_words"] += sum(len(t.split()) for t in r["tags"])
            for k, nk in (("desc", "neg_desc"), ("tags", "neg_tags")):
                for p, q in zip(r[k], r[nk]):
                    sums["pairs"] += 1
                    sums["identical"] += p.strip().lower() == q.strip().lower()

    def ratio(num: str, den: str):
        return round(sums[num] / sums[den], 4) if sums[den] else None

    n = sum(status.values())
    sums["rows"] = n
    return {
        "generation": int(generation),
        "rows": n,
        "by_status": dict(status),
        "parse_rate": ratio("usable", "rows"),
        "ok_rate": round(status.get("ok", 0) / n, 4) if n else None,
        "mean_attempts": ratio("attempts", "rows"),
        "sentences_per_image": ratio("sentences", "usable"),
        "words_per_sentence": ratio("sentence_words", "sentences"),
        "tags_per_image": ratio("tags", "usable"),
        "words_per_tag": ratio("tag_words", "tags"),
        "identical_negative_share": ratio("identical", "pairs"),
        "score_mean": ratio("score_sum", "scores"),
        "score_positive_share": ratio("score_positive", "scores"),
        "repairs": dict(repairs.most_common(TOP_REASONS)),
        "failures": dict(failures.most_common(TOP_REASONS)),
    }
