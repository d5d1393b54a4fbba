"""Turn what an annotator wrote into a valid four-formula record, repairing the common defects.

`parse_output(text)` returns a `ParseResult`: `status` "ok" (valid JSON, valid record, nothing changed),
"repaired" (usable after the repairs named in `reason`) or "failed" (`record` is None, `reason` says why).

Repaired:
- text before or after the JSON object, markdown code fences, a left-out opening brace;
- output cut off (max tokens): an unfinished string is dropped, open lists and objects are closed;
- trailing commas, missing commas between items, single-quoted or unquoted strings, stray quotes inside
  a string;
- a field that is one string instead of a list; numbers as items (made strings); null, nested or empty
  items (dropped together with their aligned partner, so pairs stay aligned);
- positive/negative count mismatch: both lists cut to the shorter one (the aligned prefix is kept, since
  a model writes pairs in order);
- unexpected extra keys (dropped).

Failed, by decision: a missing or empty field among the four. The training loss needs all of them (the
positive text is drawn from `desc`, the hard negative from `neg_desc` or `neg_tags`, the tag head learns
`tags`), and a negative cannot be invented without the model. A failed row still keeps its raw output.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from .lenient_json import LenientReader
from .schema import FORMULA_KEYS, PAIRS

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.S)
_MAX_CANDIDATES = 20  # '{' positions tried when prose around the JSON contains braces too


@dataclass(frozen=True)
class ParseResult:
    record: Optional[dict]
    status: str  # "ok", "repaired", "failed"
    reason: str  # repairs made, or why it failed; "" when ok

    @property
    def usable(self) -> bool:
        return self.record is not None


def _candidates(text: str) -> list[tuple[str, list[str]]]:
    """(text to read, repairs already made) pairs: the fenced block first when there is one."""
    out = []
    fenced = _FENCE.search(text)
    if fenced and "{" in fenced.group(1):
        out.append((fenced.group(1), ["code fence"]))
    out.append((text, []))
    return out


def _read_object(text: str) -> tuple[Optional[dict], list[str]]:
    """The first JSON object in `text` that has a formula key, read strictly or leniently."""
    first_dict: tuple[Optional[dict], list[str]] = (None, [])
    for body, pre in _candidates(text):
        starts = [m.start() for m in re.finditer(r"\{", body)][:_MAX_CANDIDATES]
        for start in starts:
            repairs = list(pre)
            if body[:start].strip():
                repairs.append("text before JSON")
            try:
                obj, end = json.JSONDecoder().raw_decode(body, start)
            except ValueError:
                reader = LenientReader(body, start)
                obj, end = reader.value(), reader.i
                repairs += reader.repairs
            if body[end:].strip():
                repairs.append("text after JSON")
            if isinstance(obj, dict):
                if _has_formula_key(obj):
                    return obj, repairs
                if first_dict[0] is None:
                    first_dict = (obj, repairs)
    # The opening brace left out: the text starts at the first key.
    key = re.search(r"[\"']\s*(%s)\s*[\"']\s*:" % "|".join(FORMULA_KEYS), text)
    if key and (first_dict[0] is None or not _has_formula_key(first_dict[0])):
        reader = LenientReader("{" + text[key.start() :], 0)
        obj = reader.value()
        if isinstance(obj, dict) and _has_formula_key(obj):
            repairs = ["missing opening brace"] + (["text before JSON"] if text[: key.start()].strip() else [])
            if text[key.start() :][reader.i - 1 :].strip():
                repairs.append("text after JSON")
            return obj, repairs + reader.repairs
    return first_dict


def _has_formula_key(obj: dict) -> bool:
    return any(isinstance(k, str) and k.strip().lower() in FORMULA_KEYS for k in obj)


def _clean_items(key: str, value: Any, repairs: list[str]) -> list[Optional[str]]:
    """A field as a list of stripped strings, with None where an item cannot be a string."""
    if isinstance(value, str):
        repairs.append(f"'{key}' was a string, made a list")
        value = [value]
    if not isinstance(value, list):
        return []
    items: list[Optional[str]] = []
    for item in value:
        if isinstance(item, str):
            items.append(item.strip() or None)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            repairs.append(f"'{key}' had numbers, made strings")
            items.append(str(item))
        else:
            items.append(None)
    return items


def normalize_record(obj: Any) -> tuple[Optional[dict], list[str], str]:
    """(record or None, repairs made, failure reason) for a parsed object; shared with seed import."""
    if not isinstance(obj, dict):
        return None, [], f"not a JSON object but {type(obj).__name__}"
    repairs: list[str] = []
    fields = {}
    for k, v in obj.items():
        name = k.strip().lower() if isinstance(k, str) else k
        if name in FORMULA_KEYS:
            fields[name] = v
            if name != k:
                repairs.append("key names normalised")
    extra = [k for k in obj if not (isinstance(k, str) and k.strip().lower() in FORMULA_KEYS)]
    if extra:
        repairs.append(f"dropped keys {sorted(map(str, extra))[:5]}")
    missing = [k for k in FORMULA_KEYS if k not in fields]
    if missing:
        return None, repairs, f"missing keys {missing}"
    record = {}
    for pos, neg in PAIRS:
        a = _clean_items(pos, fields[pos], repairs)
        b = _clean_items(neg, fields[neg], repairs)
        if len(a) != len(b):
            repairs.append(f"'{pos}'/'{neg}' counts {len(a)}/{len(b)}: cut to {min(len(a), len(b))}")
        pairs = list(zip(a, b))
        kept = [(x, y) for x, y in pairs if x is not None and y is not None]
        if len(kept) != len(pairs):
            repairs.append(f"dropped {len(pairs) - len(kept)} empty or non-string '{pos}'/'{neg}' pairs")
        if not kept:
            return None, repairs, f"'{pos}'/'{neg}' have no usable aligned pair"
        record[pos], record[neg] = [x for x, _ in kept], [y for _, y in kept]
    return record, list(dict.fromkeys(repairs)), ""


def parse_output(text: Optional[str]) -> ParseResult:
    """Parse and repair one model output; see the module docstring for what is repaired and what fails."""
    if text is None or not text.strip():
        return ParseResult(None, "failed", "empty output")
    obj, repairs = _read_object(text)
    if obj is None:
        return ParseResult(None, "failed", "no JSON object in output")
    record, more, failure = normalize_record(obj)
    repairs = list(dict.fromkeys(repairs + more))
    if record is None:
        detail = f" (after: {'; '.join(repairs)})" if repairs else ""
        return ParseResult(None, "failed", failure + detail)
    if repairs:
        return ParseResult(record, "repaired", "; ".join(repairs))
    return ParseResult(record, "ok", "")
