"""Token length of the VLM-150M four-formula JSON and of the student prompt, for the real configs' budgets.

    python benchmarks/token_budget.py        # writes benchmarks/results/token_budget.{md,json}

Tokenizer: open_clip's bundled CLIP BPE (`open_clip.tokenizer.SimpleTokenizer`, 49,408 tokens, byte-level
BPE on lower-cased text), the one BPE vocabulary available offline here. The real LMs' tokenizers are
not on this machine (no hub): Qwen2.5's (151k byte-level BPE) writes English in about as many tokens
or fewer; Llama-2's (32k SentencePiece, LLaVA-1.5) in up to ~30% more, hence `LLAMA_MARGIN`.

Records: the VLM-150M schema is {"desc", "neg_desc", "tags", "neg_tags"}; no released record is on this
machine, so the records below are written by hand in its style (HQ-CLIP, arXiv 2507.22431, Sec. 3:
several "the image shows" sentences, ~7-10 short tags, each with a minimal-edit negative), at three
lengths. They are assumptions, stated as such; the budgets follow from the longest one with a margin.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cycle.annotate.schema import build_prompt, to_target_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
MARGIN = 1.25  # answers run longer than the examples; a cut answer is a failed row
LLAMA_MARGIN = 1.3  # SentencePiece 32k vs the CLIP BPE on English (see the docstring)
ROUND = 32


def _neg(sentences: list[str], swaps: list[tuple[str, str]]) -> list[str]:
    return [s.replace(a, b, 1) for s, (a, b) in zip(sentences, swaps)]


SHORT_DESC = [
    "the image shows a red bicycle leaning against a white brick wall.",
    "the image shows a small potted plant on the ground next to the bicycle.",
]
TYPICAL_DESC = [
    "the image shows a golden retriever sitting on a wooden porch in front of a blue front door.",
    "the image shows the dog wearing a red collar with a round silver tag hanging from it.",
    "the image shows two pumpkins and a straw basket placed on the steps to the left of the dog.",
    "the image shows warm afternoon sunlight falling across the porch from the right side.",
]
LONG_DESC = [
    "the image shows a busy street market at dusk with rows of stalls covered by striped awnings.",
    "the image shows a vendor in a green apron weighing oranges on a metal scale at the front stall.",
    "the image shows crates of red apples, yellow bananas and purple grapes stacked along the counter.",
    "the image shows three customers waiting in line, one of them holding a woven shopping bag.",
    "the image shows strings of warm light bulbs hanging above the stalls against a dark blue sky.",
    "the image shows a hand-written price sign in white chalk on a small black board.",
]
RECORDS = {
    "short (2 sentences, 5 tags)": {
        "desc": SHORT_DESC,
        "neg_desc": _neg(SHORT_DESC, [("red", "green"), ("next to", "far from")]),
        "tags": ["red bicycle", "white brick wall", "potted plant", "street", "daylight"],
        "neg_tags": ["green bicycle", "red brick wall", "cut flowers", "forest path", "night"],
    },
    "typical (4 sentences, 8 tags)": {
        "desc": TYPICAL_DESC,
        "neg_desc": _neg(
            TYPICAL_DESC, [("golden retriever", "black poodle"), ("red", "blue"), ("two", "five"), ("right", "left")]
        ),
        "tags": [
            "golden retriever",
            "wooden porch",
            "blue front door",
            "red collar",
            "silver tag",
            "pumpkins",
            "straw basket",
            "afternoon sunlight",
        ],
        "neg_tags": [
            "black poodle",
            "stone patio",
            "red front door",
            "blue collar",
            "gold tag",
            "watermelons",
            "plastic bucket",
            "moonlight",
        ],
    },
    "long (6 sentences, 10 tags)": {
        "desc": LONG_DESC,
        "neg_desc": _neg(
            LONG_DESC,
            [
                ("dusk", "noon"),
                ("green", "red"),
                ("purple grapes", "green pears"),
                ("three", "seven"),
                ("warm", "cold"),
                ("white", "pink"),
            ],
        ),
        "tags": [
            "street market",
            "striped awnings",
            "vendor",
            "green apron",
            "oranges",
            "metal scale",
            "apples",
            "customers",
            "light bulbs",
            "chalk price sign",
        ],
        "neg_tags": [
            "shopping mall",
            "plain awnings",
            "police officer",
            "red apron",
            "lemons",
            "wooden scale",
            "tomatoes",
            "empty street",
            "neon signs",
            "printed poster",
        ],
    },
}
ALT_TEXTS = {
    "empty": "",
    "short": "golden retriever on porch",
    "web caption": "Our dog Max enjoying the autumn sun on the porch - fall 2019 photo by Jane (IMG_2041.JPG)",
    "shop spam": "Buy cheap golden retriever porch decor pumpkins basket free shipping best price 50% off today only",
}


def round_up(n: float) -> int:
    return int(math.ceil(n / ROUND) * ROUND)


def main() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    answers = {}
    for name, rec in RECORDS.items():
        text = to_target_json(rec)
        answers[name] = {
            "words": sum(len(s.split()) for k in rec for s in rec[k]),
            "chars": len(text),
            "tokens": len(tok.encode(text)),
        }
    prompts = {name: len(tok.encode(build_prompt(alt))) for name, alt in ALT_TEXTS.items()}
    answer_max, prompt_max = max(a["tokens"] for a in answers.values()), max(prompts.values())
    budget = {
        "annotate.max_new_tokens": round_up(answer_max * MARGIN),
        "lvlm.lm.max_length": round_up((answer_max + prompt_max) * MARGIN),
        "annotate.max_new_tokens (Llama-2 tokenizer)": round_up(answer_max * MARGIN * LLAMA_MARGIN),
        "lvlm.lm.max_length (Llama-2 tokenizer)": round_up((answer_max + prompt_max) * MARGIN * LLAMA_MARGIN),
    }
    result = {
        "tokenizer": "open_clip SimpleTokenizer (CLIP BPE, 49,408 tokens, bundled with open_clip)",
        "answers": answers,
        "prompts": prompts,
        "answer_max": answer_max,
        "prompt_max": prompt_max,
        "margin": MARGIN,
        "llama_margin": LLAMA_MARGIN,
        "budget": budget,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "token_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Token budget of the four formulas (benchmarks/token_budget.py)",
        "",
        f"Tokenizer: {result['tokenizer']}. Records written by hand in the VLM-150M style (see the script).",
        "",
        "| answer (compact JSON) | words | chars | tokens |",
        "|---|---:|---:|---:|",
        *[f"| {k} | {v['words']} | {v['chars']} | {v['tokens']} |" for k, v in answers.items()],
        "",
        "| student prompt with alt-text | tokens |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in prompts.items()],
        "",
        f"Budgets (longest x {MARGIN}, rounded up to {ROUND}; Llama-2 tokenizer x {LLAMA_MARGIN} more):",
        "",
        *[f"- `{k}` >= {v}" for k, v in budget.items()],
        "",
    ]
    (OUT / "token_budget.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
