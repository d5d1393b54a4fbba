"""The tiny LM's tokenizer: byte-level BPE trained here on the run's own text.

Byte-level, so no text is ever unknown. Besides the learned merges it holds:
- special tokens: `<pad>`, `<s>` (bos, added in front of every encoded text), `</s>` (eos, ends the
  answer), `<image>` (the LLaVA image placeholder of `cycle.annotate.schema`), and the chat role markers
  `<|user|>` / `<|assistant|>` (reserved for chat-style serving; the tiny format does not use them);
- the JSON skeleton of the answer (`{"desc":["`, `","`, `"],"neg_desc":["`, ...) as ordinary tokens, cut
  from `schema.to_target_json` itself so they follow the format: a tiny model then writes the whole
  structure in a handful of tokens and rarely breaks it (measured, see ENV-FACTS).
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..annotate.schema import FORMULA_KEYS, IMAGE_TOKEN, to_target_json

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_TOKEN, USER, ASSISTANT]


def json_pieces() -> list[str]:
    """The fixed text between the values of a target JSON (two items per list, to get the separator)."""
    marker = "\ue000"  # a private-use character: kept as is by the compact JSON
    skeleton = to_target_json({k: [marker, marker] for k in FORMULA_KEYS})
    pieces = [p for p in skeleton.split(marker) if p]
    return list(dict.fromkeys(pieces))  # unique, in order


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; the result adds bos in front of every encoded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in json_pieces()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,
        padding_side="right",
        model_max_length=1_000_000,
    )
