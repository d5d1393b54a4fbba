"""The four-formula schema and the parser's repair of malformed annotator output, one corpus per defect."""

from __future__ import annotations

import json

import pytest

from cycle.annotate.parse import normalize_record, parse_output
from cycle.annotate.schema import (
    FORMULA_JSON_SCHEMA,
    FORMULA_KEYS,
    build_prompt,
    model_input,
    prompt_hash,
    to_target_json,
    validate,
)

GOOD = {
    "desc": ["the image shows two red apples.", "the apples are left of a cup."],
    "neg_desc": ["the image shows two green apples.", "the apples are right of a cup."],
    "tags": ["red apple", "cup", "table"],
    "neg_tags": ["green apple", "bowl", "chair"],
}
GOOD_JSON = to_target_json(GOOD)


# ------------------------------------------------------------------------------------------- schema
def test_target_json_is_compact_and_ordered():
    shuffled = {k: GOOD[k] for k in reversed(FORMULA_KEYS)}
    text = to_target_json(shuffled)
    assert text == GOOD_JSON
    assert list(json.loads(text)) == list(FORMULA_KEYS)
    assert ": " not in text and ", " not in text.replace("the apples are", "")
    assert validate(json.loads(text)) == []


@pytest.mark.parametrize(
    "obj, needle",
    [
        ([1, 2], "not a JSON object"),
        ({k: v for k, v in GOOD.items() if k != "neg_tags"}, "missing key 'neg_tags'"),
        ({**GOOD, "tags": "cup"}, "'tags' is str"),
        ({**GOOD, "desc": []}, "'desc' is empty"),
        ({**GOOD, "tags": ["cup", 3, ""]}, "'tags' items [1, 2]"),
        ({**GOOD, "neg_desc": GOOD["neg_desc"][:1]}, "'desc' has 2 items but 'neg_desc' has 1"),
        ({**GOOD, "caption": "x"}, "unexpected keys ['caption']"),
    ],
)
def test_validate_names_each_problem(obj, needle):
    problems = validate(obj)
    assert any(needle in p for p in problems), problems


def test_json_schema_shape_and_prompt():
    assert FORMULA_JSON_SCHEMA["required"] == list(FORMULA_KEYS)
    assert FORMULA_JSON_SCHEMA["additionalProperties"] is False
    for key in FORMULA_KEYS:
        assert FORMULA_JSON_SCHEMA["properties"][key]["items"]["type"] == "string"
    prompt = build_prompt("  IMG_2041.png\n buy   cheap ")
    assert prompt.startswith("Please generate descriptions (tags) & negative descriptions (tags) for this image:")
    assert prompt.endswith("IMG_2041.png buy cheap")
    assert build_prompt(None).endswith("reference: ")
    assert model_input(prompt, "<image>").startswith("<image>\n")
    assert len(prompt_hash()) == 16 and prompt_hash() == prompt_hash()


# ------------------------------------------------------------------------------------------- parser
def test_clean_output_is_ok():
    res = parse_output(GOOD_JSON)
    assert (res.status, res.reason, res.record) == ("ok", "", GOOD)
    assert parse_output("  " + json.dumps(GOOD, indent=2) + "\n").status == "ok"


# Each defect class: (malformed text, a word the reason must contain, what the record must hold).
CUT = GOOD_JSON[: GOOD_JSON.index('"bowl"') + 4]  # stops inside the second negative tag
CORPUS = {
    "text around": ("Sure! Here is the JSON:\n" + GOOD_JSON + "\nHope this helps.", "text before JSON", GOOD),
    "code fence": ("```json\n" + json.dumps(GOOD, indent=1) + "\n```", "code fence", GOOD),
    "fence unclosed": ("```\n" + GOOD_JSON, "code fence", GOOD),
    "unterminated": (CUT, "unterminated", {**GOOD, "tags": ["red apple"], "neg_tags": ["green apple"]}),
    "unterminated key": (GOOD_JSON[:-1] + ',"ex', "unterminated", GOOD),
    "trailing commas": (GOOD_JSON.replace('"],', '",],').replace("]}", ",]}"), "trailing comma", GOOD),
    "single quotes": (str(GOOD), "single quotes", GOOD),
    "apostrophe": (
        str({**GOOD, "tags": ["cat's toy", "cup", "table"]}).replace('"', "'"),
        "single quotes",
        {**GOOD, "tags": ["cat's toy", "cup", "table"]},
    ),
    "missing comma": (GOOD_JSON.replace('","', '" "'), "missing comma", GOOD),
    "unquoted": (
        "{desc: [the image shows a cup.], neg_desc: [the image shows a bowl.], tags: [cup], neg_tags: [bowl]}",
        "unquoted",
        {
            "desc": ["the image shows a cup."],
            "neg_desc": ["the image shows a bowl."],
            "tags": ["cup"],
            "neg_tags": ["bowl"],
        },
    ),
    "no opening brace": (GOOD_JSON[1:], "missing opening brace", GOOD),
    "count mismatch": (
        to_target_json({**GOOD, "neg_tags": GOOD["neg_tags"][:2]}),
        "counts 3/2",
        {**GOOD, "tags": GOOD["tags"][:2], "neg_tags": GOOD["neg_tags"][:2]},
    ),
    "string not list": (
        json.dumps({**GOOD, "tags": "cup", "neg_tags": "bowl"}),
        "made a list",
        {**GOOD, "tags": ["cup"], "neg_tags": ["bowl"]},
    ),
    "non-string items": (
        json.dumps({**GOOD, "tags": ["cup", 3, None, ["x"]], "neg_tags": ["bowl", 4, "a", "b"]}),
        "non-string",
        {**GOOD, "tags": ["cup", "3"], "neg_tags": ["bowl", "4"]},
    ),
    "empty items": (
        json.dumps({**GOOD, "tags": ["cup", " ", "table"], "neg_tags": ["bowl", "x", ""]}),
        "dropped 2",
        {**GOOD, "tags": ["cup"], "neg_tags": ["bowl"]},
    ),
    "wrapped in array": (json.dumps([GOOD]), "text before JSON", GOOD),
    "extra keys": (json.dumps({**GOOD, "caption": "x"}), "dropped keys", GOOD),
    "key case": (json.dumps({k.upper(): v for k, v in GOOD.items()}), "key names", GOOD),
    "escapes": (
        GOOD_JSON.replace("cup", "c\\u0075p").replace('"table"', '"ta\\"ble"')[:-1],
        "unterminated",
        {**GOOD, "tags": ["red apple", "cup", 'ta"ble'], "desc": GOOD["desc"]},
    ),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_repairs_each_defect_class(name):
    text, needle, expected = CORPUS[name]
    res = parse_output(text)
    assert res.status in ("ok", "repaired"), (name, res)
    assert needle in res.reason, (name, res.reason)
    assert res.record == expected
    assert validate(res.record) == []


FAILS = {
    "empty": ("", "empty output"),
    "whitespace": ("  \n ", "empty output"),
    "prose": ("I cannot describe this image.", "no JSON object"),
    "garbage tokens": ("ap ap cup ,,] the the", "no JSON object"),
    "missing negatives": (
        json.dumps({"desc": GOOD["desc"], "tags": GOOD["tags"]}),
        "missing keys ['neg_desc', 'neg_tags']",
    ),
    "cut before tags": (GOOD_JSON[: GOOD_JSON.index('"tags"') + 3], "missing keys ['tags', 'neg_tags']"),
    "empty field": (json.dumps({**GOOD, "tags": [], "neg_tags": []}), "no usable aligned pair"),
    "all items bad": (json.dumps({**GOOD, "desc": [None, {}], "neg_desc": ["a", "b"]}), "no usable aligned pair"),
    "other object": ('{"answer": 42}', "missing keys"),
}


@pytest.mark.parametrize("name", sorted(FAILS))
def test_unrecoverable_outputs_fail_with_reason(name):
    text, needle = FAILS[name]
    res = parse_output(text)
    assert res.status == "failed" and res.record is None
    assert needle in res.reason, (name, res.reason)


def test_normalize_record_is_shared_with_import():
    record, repairs, failure = normalize_record({**GOOD, "tags": "cup", "neg_tags": "bowl"})
    assert failure == "" and record["tags"] == ["cup"] and repairs
    assert normalize_record("x")[2].startswith("not a JSON object")
