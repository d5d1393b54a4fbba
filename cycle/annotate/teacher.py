"""Teacher annotations for the seed set: imported from files, or asked of an OpenAI-compatible endpoint.

`import_seed(path, store)` reads VLM-150M-format JSON (a directory of `<id>.json`, a JSONL file, or one
JSON file holding a list or an id -> record mapping) into the `seed` table. `teach_seed(...)` has a
teacher model (GPT-4o in the paper) annotate chosen samples. Whatever cannot be used (unreadable file,
unknown id, an annotation that does not repair into the four formulas) goes to the `rejects` table with
its reason: nothing is silently dropped. Seed rows carry no status: a seed row is a usable record by
construction (a document whose own `status` is not usable, `store.is_usable`, is rejected on import).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm

from ..errors import HQClipError
from ..files import write_text_atomic
from ..store import is_usable
from .backends import Backend
from .parse import normalize_record
from .run import AnnotateError, generate_with_retries
from .schema import FORMULA_KEYS, build_teacher_prompt

REJECT_DETAIL_CHARS = 2000  # of a reject's detail kept in the table
RAW_OUTPUT_CHARS = 1500  # of an unusable teacher output quoted in its reject
SCAN_ROWS = 256  # samples read per store batch


class SeedFileNotFound(HQClipError, FileNotFoundError):
    """The seed annotations path does not exist (also a FileNotFoundError, as it was)."""


_ID_KEYS = ("uid", "id", "key")
_META_KEYS = {*_ID_KEYS, "alt_text", "status", "url", "caption", "reason", "source"}  # ignored on import


def _documents(path: Path) -> Iterator[tuple[str, Any, Optional[str]]]:
    """(where, parsed document or None, error) for every document under `path`."""
    if path.is_dir():
        for f in sorted(path.rglob("*.json")):
            try:
                yield f.name, json.loads(f.read_text(encoding="utf-8")), None
            except (ValueError, UnicodeDecodeError) as err:
                yield f.name, None, f"unreadable JSON: {err}"
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield f"{path.name}:{n}", json.loads(line), None
                    except ValueError as err:
                        yield f"{path.name}:{n}", None, f"unreadable JSON: {err}"
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            yield path.name, None, f"unreadable JSON: {err}"
            return
        if isinstance(doc, list):
            for n, item in enumerate(doc):
                yield f"{path.name}[{n}]", item, None
        elif isinstance(doc, dict) and not any(k in doc for k in FORMULA_KEYS):
            for key, item in doc.items():  # {id: record}
                yield key, ({"id": key, **item} if isinstance(item, dict) else item), None
        else:
            yield path.name, doc, None


def _doc_id(where: str, doc: Any) -> Optional[str]:
    if isinstance(doc, dict):
        for k in _ID_KEYS:
            if doc.get(k) not in (None, ""):
                return str(doc[k])
    if where.endswith(".json"):
        return where[: -len(".json")]  # one file per image, named by its id
    return None


def import_seed(
    path: str | Path,
    store,
    samples_version: Optional[int | str] = None,
    origin: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Import teacher annotations into `seed`. Returns counts: read, imported, already_present, rejected."""
    path = Path(path)
    if not path.exists():
        raise SeedFileNotFound(
            f"seed annotations '{path}' do not exist (expected a directory of <id>.json, a .jsonl file or a .json file)"
        )
    known = store.ids("samples", version=samples_version)
    origin = origin or f"import:{path.name}"
    rows, rejects, read = [], [], 0
    for where, doc, error in tqdm(_documents(path), desc="import seed", unit="doc", disable=not progress):
        read += 1
        key = _doc_id(where, doc)
        if error:
            rejects.append(("unreadable_json", key or where, error))
            continue
        if isinstance(doc, dict) and doc.get("status") is not None and not is_usable(doc["status"]):
            rejects.append(("failed_annotation", key or where, f"status {doc.get('status')!r}"))
            continue
        if key is None:
            rejects.append(("missing_id", where, "no uid/id field and not named <id>.json"))
            continue
        if key not in known:
            rejects.append(("unknown_id", key, f"{where}: id not in samples"))
            continue
        body = {k: v for k, v in doc.items() if k not in _META_KEYS} if isinstance(doc, dict) else doc
        record, _, failure = normalize_record(body)
        if record is None:
            rejects.append(("invalid_annotation", key, f"{where}: {failure}"))
            continue
        rows.append({"id": key, **record, "origin": origin})
    before = store.count("teacher")
    imported = store.insert_new("teacher", rows)
    _reject(store, f"seed-import:{path}", rejects)
    reasons: dict[str, int] = {}
    for reason, _, _ in rejects:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "read": read,
        "valid": len(rows),
        "imported": imported,
        "already_present": len(rows) - imported,
        "teacher_rows_before": before,
        "rejected": reasons,
    }


def _reject(store, source: str, rejects: list[tuple[str, str, str]]) -> None:
    if rejects:
        store.append(
            "rejects",
            [{"source": source, "key": k, "reason": r, "detail": d[:REJECT_DETAIL_CHARS]} for r, k, d in rejects],
        )


def choose_seed_ids(store, samples_version: int | str, n: int, seed: int = 0, split: str = "train") -> list[str]:
    """A seeded random choice of `n` ids of `split` (the paper's 10k of 150M), in a stable order."""
    ids = sorted(store.ids("samples", f"split = '{split}'", version=samples_version))
    if n > len(ids):
        raise AnnotateError(f"asked for {n} seed ids but split '{split}' has {len(ids)} samples")
    return sorted(random.Random(seed).sample(ids, n))


def teach_seed(
    cfg: Any,
    store,
    samples_version: int | str,
    ids: Iterable[str],
    out_dir: str | Path,
    backend: Optional[Backend] = None,
    progress: bool = True,
) -> dict:
    """Have the teacher (the openai backend of `cfg`, an `AnnotateConfig`) annotate `ids` into `seed`.

    Ids already in `seed` are skipped; the request log in `out_dir` makes a restart re-pay nothing.
    Outputs that stay unusable after `cfg.retries` retries go to `rejects` with the raw text.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(ids) - store.ids("teacher")
    unknown = wanted - store.ids("samples", version=samples_version)
    if unknown:
        raise AnnotateError(f"{len(unknown)} seed ids are not in samples@{samples_version}, e.g. {sorted(unknown)[0]}")
    own = backend is None
    if own:
        from .backends.openai_backend import OpenAIBackend

        backend = OpenAIBackend(
            cfg.openai,
            max_new_tokens=max(cfg.max_new_tokens, 1024),
            temperature=cfg.temperature,
            request_log=out_dir / "requests.jsonl",
        )
    origin = f"teacher:{backend.fingerprint}"
    written, failed = 0, 0
    bar = tqdm(total=len(wanted), desc="teach seed", unit="img", disable=not progress)
    try:
        batch: list[dict] = []
        scan = store.scan("samples", ["id", "image", "alt_text"], version=samples_version, batch_size=SCAN_ROWS)
        for rb in scan:
            batch += [r for r in rb.to_pylist() if r["id"] in wanted]
            while len(batch) >= cfg.batch_size:
                chunk, batch = batch[: cfg.batch_size], batch[cfg.batch_size :]
                w, f = _teach_batch(backend, chunk, cfg, store, origin)
                written, failed = written + w, failed + f
                bar.update(len(chunk))
        if batch:
            w, f = _teach_batch(backend, batch, cfg, store, origin)
            written, failed = written + w, failed + f
            bar.update(len(batch))
    finally:
        bar.close()
        if own:
            backend.close()
    stats = {"asked": len(wanted), "written": written, "failed": failed, "teacher": backend.fingerprint}
    write_text_atomic(out_dir / "teach_stats.json", json.dumps(stats, indent=2))
    return stats


def _teach_batch(backend: Backend, samples: list[dict], cfg: Any, store, origin: str) -> tuple[int, int]:
    items = [(s["image"], build_teacher_prompt(s["alt_text"])) for s in samples]
    outputs, results, _ = generate_with_retries(backend, items, [s["id"] for s in samples], cfg)
    rows = [{"id": s["id"], **r.record, "origin": origin} for s, r in zip(samples, results) if r.usable]
    bad = [
        ("teacher_output_unusable", s["id"], f"{getattr(o, 'reason', '') or r.reason}: {str(o)[:RAW_OUTPUT_CHARS]}")
        for s, r, o in zip(samples, results, outputs)
        if not r.usable
    ]
    _reject(store, "teacher", bad)
    return store.insert_new("teacher", rows), len(bad)
