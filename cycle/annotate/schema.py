"""The four text formulas of one image, in the released VLM-150M format, and the prompts that ask for them.

One record per image:

    {"desc": [sentences], "neg_desc": [same count], "tags": [short phrases], "neg_tags": [same count]}

`neg_desc[i]` is a minimal edit of `desc[i]` (object, attribute, number or place swapped) and
`neg_tags[i]` a swapped version of `tags[i]` (HQ-CLIP, arXiv 2507.22431, Sec. 3 and its released data).

What the LVLM sees, in SFT and in annotation alike, is `model_input(build_prompt(alt_text))` followed by
the answer `to_target_json(record)`; the SFT code and the annotation backends both take these functions
from here so the two can never drift apart. Both go through `render_input(processor, prompt)`: our own
LLaVAs' chat template renders exactly `model_input` (one fixed, short format is easier for a model trained
from scratch), a LLaVA built on a base checkpoint (`lvlm.base`) keeps the base's conversation format.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FORMULA_KEYS: tuple[str, ...] = ("desc", "neg_desc", "tags", "neg_tags")
# Each positive field and the negative field aligned with it, one to one.
PAIRS: tuple[tuple[str, str], ...] = (("desc", "neg_desc"), ("tags", "neg_tags"))

_string_list = {"type": "array", "items": {"type": "string"}, "minItems": 1}

# JSON schema for structured output (vLLM `StructuredOutputsParams(json=...)`, OpenAI `response_format`).
# Only keywords that strict-mode servers and grammar engines all accept (no minLength: empty strings are
# dropped by the parser instead). JSON schema cannot say "same length as another array"; `validate` and
# the parser check the alignment.
FORMULA_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {key: dict(_string_list) for key in FORMULA_KEYS},
    "required": list(FORMULA_KEYS),
    "additionalProperties": False,
}

# The student prompt of the paper, with the raw alt-text given as a reference.
STUDENT_PROMPT = "Please generate descriptions (tags) & negative descriptions (tags) for this image:"

# The teacher prompt (GPT-4o in the paper, any OpenAI-compatible endpoint here): it spells out the format
# because a general model has not been fine-tuned on it.
TEACHER_PROMPT = (
    "Given an image-text pair crawled from the internet, take the text only as a reference: it may be "
    "wrong, incomplete or spam. Describe what the image really shows. Answer with one JSON object with "
    'four lists of strings: "desc": lower-case sentences, each starting "the image shows"; '
    '"neg_desc": the same number of sentences, each a minimal edit of the matching desc sentence that '
    'makes it false (swap one object, attribute, number or position); "tags": about 7 short noun '
    'phrases that are in the image; "neg_tags": the same number, each a swapped version of the matching '
    "tag that is not in the image."
)

IMAGE_TOKEN = "<image>"
FORMAT_VERSION = 1  # bump when the input text format below changes: it changes `prompt_hash`


def build_prompt(alt_text: str | None) -> str:
    """The student prompt for one image with its raw alt-text as a reference (empty alt-text allowed)."""
    alt = " ".join((alt_text or "").split())
    return f"{STUDENT_PROMPT}\nreference: {alt}"


def build_teacher_prompt(alt_text: str | None) -> str:
    alt = " ".join((alt_text or "").split())
    return f"{TEACHER_PROMPT}\nThe crawled text: {alt}"


def model_input(prompt: str, image_token: str = IMAGE_TOKEN) -> str:
    """The full text the LVLM reads before its answer: image placeholder, prompt, answer cue."""
    return f"{image_token}\n{prompt}\nanswer:"


def render_input(processor, prompt: str) -> str:
    """The model input through `processor`'s chat template when it has one (a LLaVA built on a base
    checkpoint keeps the base's conversation format), else `model_input`. The template of our own LLaVAs
    renders exactly `model_input(prompt)`, so both paths give the tiny models the same text."""
    if processor is None or not getattr(processor, "chat_template", None):
        return model_input(prompt, getattr(processor, "image_token", None) or IMAGE_TOKEN)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def to_target_json(record: dict) -> str:
    """Compact JSON of the four fields in fixed order, no spaces: the SFT target and what a model writes."""
    return json.dumps({k: list(record[k]) for k in FORMULA_KEYS}, ensure_ascii=False, separators=(",", ":"))


def validate(obj: Any) -> list[str]:
    """Problems that make `obj` not a valid record; an empty list means valid."""
    if not isinstance(obj, dict):
        return [f"not a JSON object but {type(obj).__name__}"]
    problems = []
    for key in FORMULA_KEYS:
        if key not in obj:
            problems.append(f"missing key '{key}'")
            continue
        value = obj[key]
        if not isinstance(value, list):
            problems.append(f"'{key}' is {type(value).__name__}, expected a list of strings")
        elif not value:
            problems.append(f"'{key}' is empty")
        else:
            bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item.strip()]
            if bad:
                problems.append(f"'{key}' items {bad[:5]} are not non-empty strings")
    extra = sorted(set(obj) - set(FORMULA_KEYS))
    if extra:
        problems.append(f"unexpected keys {extra}")
    for pos, neg in PAIRS:
        a, b = obj.get(pos), obj.get(neg)
        if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
            problems.append(f"'{pos}' has {len(a)} items but '{neg}' has {len(b)}")
    return problems


def prompt_hash() -> str:
    """Fingerprint of everything that shapes the model's input and expected output format."""
    blob = json.dumps([FORMAT_VERSION, STUDENT_PROMPT, model_input("{prompt}"), FORMULA_JSON_SCHEMA], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
