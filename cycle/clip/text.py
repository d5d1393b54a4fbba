"""Turning a batch's texts into token tensors for the HQ-CLIP loss, and the STC tag vocabulary.

Per sample (see `TextDrawer`):
- positive: the long description with probability `loss.long_text_prob`, else the raw alt-text (always
  the alt-text for a sample without annotation, and in generation 0);
- negative: the negative tags (joined as a phrase list) with probability `loss.neg_tags_prob`, else the
  long negative description; the other one when the drawn one is empty; none when both are.
  A negative that reads like its positive is dropped (`neg_valid` false).
- long descriptions fit the text context by whole sentences (`loss.text_fit="sample"`: a random subset of
  sentences that fits, kept in order; `"truncate"`: leading sentences, cut by the tokenizer). When the
  negative is the long negative and the positive the long description, both use the same sentence
  indices (sentence k of `neg_desc` is the edit of sentence k of `desc`). Every cut is counted in the
  batch stats (`truncated`), never silent.
Draws are a pure function of (seed, step, sample id): the same on any rank count, and on resume.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..config import LossConfig

TAG_JOIN = ", "
_EDGE_PUNCT = " \t\n.,;:!?\"'`()[]{}"
OPEN_CLIP_CONTEXT = 77  # open_clip's text context, for a tokenizer that does not say its own
START_END_TOKENS = 2  # every tokenized text carries a start and an end token
# Distinct texts whose token counts are kept: a run's texts repeat every epoch; the cap bounds the memory.
TOKEN_CACHE_SIZE = 200_000
# Counting with a tokenizer that always pads/cuts to a context: a context this many times the real one
# lets a long text show its full length.
COUNT_CONTEXT_FACTOR = 4


# ------------------------------------------------------------------------------------------ tags
def normalise_tag(tag: str) -> str:
    """Lower-case, collapse spaces, strip edge punctuation, and singularise the last word when easy."""
    words = re.sub(r"\s+", " ", str(tag).lower()).strip(_EDGE_PUNCT).split(" ")
    if not words or not words[0]:
        return ""
    words[-1] = _singular(words[-1])
    return " ".join(words)


def _singular(word: str) -> str:
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")):
        return word[:-1]
    return word


def build_tag_vocab(tag_lists: Iterable[Sequence[str]], size: int, min_count: int = 1) -> list[str]:
    """The `size` most frequent normalised tags (counted once per sample) seen at least `min_count` times.

    Ties break alphabetically, so the vocabulary is a pure function of the tag lists.
    """
    if size < 1:
        raise ValueError(f"tag vocabulary size must be >= 1, got {size}")
    counts: Counter = Counter()
    for tags in tag_lists:
        counts.update({t for t in (normalise_tag(x) for x in tags or []) if t})
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return ranked[:size]


def multi_hot(tag_lists: Sequence[Sequence[str]], vocab_index: dict[str, int]) -> torch.Tensor:
    """(len(tag_lists), len(vocab)) float targets: 1 where a sample's normalised tag is in the vocabulary."""
    out = torch.zeros(len(tag_lists), len(vocab_index))
    for i, tags in enumerate(tag_lists):
        for t in tags or []:
            k = vocab_index.get(normalise_tag(t))
            if k is not None:
                out[i, k] = 1.0
    return out


# ------------------------------------------------------------------------------------------ texts
def text_key(text: str) -> int:
    """A signed 64-bit key of a text as the tokenizer sees it (case and spacing ignored)."""
    norm = re.sub(r"\s+", " ", text).strip().lower()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little", signed=True)


def _id_entropy(sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(str(sample_id).encode(), digest_size=8).digest(), "little")


class TokenCounter:
    """Token counts (with start/end tokens) of open_clip tokenizers, cached per text."""

    def __init__(self, tokenizer, context_length: int, cache_size: int = TOKEN_CACHE_SIZE):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.cache: dict[str, int] = {}
        self.cache_size = cache_size

    def __call__(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            if hasattr(self.tokenizer, "encode"):  # open_clip SimpleTokenizer: BPE ids without sot/eot
                n = len(self.tokenizer.encode(text)) + START_END_TOKENS
            else:  # other open_clip tokenizers: count non-pad ids of an unbounded encoding
                wide = COUNT_CONTEXT_FACTOR * self.context_length
                n = int((self.tokenizer([text], context_length=wide)[0] != 0).sum())
            if len(self.cache) < self.cache_size:
                self.cache[text] = n
        return n

    def cost(self, part: str) -> int:
        """Tokens a part adds inside a joined text (without the start/end pair)."""
        return self(part) - START_END_TOKENS


def fit_parts(costs: Sequence[int], budget: int, rng: np.random.Generator, max_parts: int = 0) -> list[int]:
    """Indices of whole parts (sentences, tags) whose summed costs fit `budget`, in their original order.

    Parts are tried in a random order and each one that still fits is kept, so every part is kept when
    all fit. When not even one fits, a single random part is returned whole (the tokenizer cuts it, and
    the caller counts the cut).
    """
    if not costs:
        return []
    order = rng.permutation(len(costs))
    chosen, used = [], 0
    for i in order:
        if max_parts and len(chosen) >= max_parts:
            break
        if used + costs[i] <= budget:
            chosen.append(int(i))
            used += costs[i]
    return sorted(chosen) if chosen else [int(order[0])]


class TextDrawer:
    """Draws and tokenizes each sample's positive and negative text; builds STC targets.

    Args:
        cfg: the loss section (`long_text_prob`, `neg_tags_prob`, `max_sentences`, `text_fit`).
        tokenizer: the CLIP's open_clip tokenizer; `context_length` defaults to the tokenizer's.
        use_annotations: False in generation 0 (alt-text only, no negatives, no tags).
        negatives: tokenize negatives (HNI on); tag_vocab: STC vocabulary (STC on), else None.
    """

    def __init__(
        self,
        cfg: LossConfig,
        tokenizer,
        seed: int = 0,
        *,
        use_annotations: bool = True,
        negatives: bool = True,
        tag_vocab: Optional[Sequence[str]] = None,
        context_length: Optional[int] = None,
    ):
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, int(seed)
        self.context_length = int(context_length or getattr(tokenizer, "context_length", OPEN_CLIP_CONTEXT))
        self.count = TokenCounter(tokenizer, self.context_length)
        self.use_annotations = use_annotations
        self.negatives = negatives and use_annotations
        self.tag_vocab = list(tag_vocab) if (tag_vocab and use_annotations) else None
        self.vocab_index = {t: i for i, t in enumerate(self.tag_vocab or [])}

    def __call__(self, batch: dict, step: int) -> dict:
        """Token tensors for a collated batch (`collate_pairs` lists). Returns a dict of tensors + `stats`."""
        ids, alts = batch["id"], batch["alt_text"]
        n = len(ids)
        empty = [[]] * n
        desc, neg_desc = batch.get("desc", empty), batch.get("neg_desc", empty)
        tags, neg_tags = batch.get("tags", empty), batch.get("neg_tags", empty)
        annotated = batch.get("annotated")
        annotated = [bool(a) for a in annotated] if annotated is not None else [False] * n
        stats = Counter()
        positives, negatives, valid = [], [], []
        for i in range(n):
            rng = np.random.default_rng([self.seed, int(step), _id_entropy(ids[i])])
            use = self.use_annotations and annotated[i]
            pos, neg = self._draw_one(
                rng,
                alts[i] or "",
                desc[i] if use else [],
                neg_desc[i] if use else [],
                neg_tags[i] if use else [],
                stats,
            )
            positives.append(pos)
            if self.negatives:
                ok = bool(neg) and text_key(neg) != text_key(pos)
                stats["neg_same_as_pos"] += int(bool(neg) and not ok)
                negatives.append(neg if ok else "")
                valid.append(ok)
        out = {
            "texts": self.tokenizer(positives, context_length=self.context_length),
            "text_keys": torch.tensor([text_key(t) for t in positives], dtype=torch.long),
        }
        if self.negatives:
            out["neg_texts"] = self.tokenizer(negatives, context_length=self.context_length)
            out["neg_valid"] = torch.tensor(valid, dtype=torch.bool)
            out["neg_keys"] = torch.tensor([text_key(t) for t in negatives], dtype=torch.long)
        if self.tag_vocab is not None:
            out["tag_targets"] = multi_hot([t if a else [] for t, a in zip(tags, annotated)], self.vocab_index)
        stats["samples"] = n
        out["stats"] = dict(stats)
        return out

    def _draw_one(self, rng, alt: str, desc: list, neg_desc: list, neg_tags: list, stats: Counter):
        long_pos = bool(desc) and rng.random() < self.cfg.long_text_prob
        neg_source = None
        if self.negatives:
            want_tags = rng.random() < self.cfg.neg_tags_prob
            if want_tags and neg_tags:
                neg_source = "tags"
            elif neg_desc:
                neg_source = "desc"
            elif neg_tags:
                neg_source = "tags"
        aligned = long_pos and neg_source == "desc" and len(neg_desc) == len(desc)

        budget = self.context_length - START_END_TOKENS
        pos_idx: list[int] = []
        if long_pos:
            costs = [self.count.cost(s) for s in desc]
            if aligned:  # one set of sentence indices must fit both texts
                costs = [max(c, self.count.cost(s)) for c, s in zip(costs, neg_desc)]
            pos_idx = self._fit(costs, budget, rng)
            pos = " ".join(desc[k] for k in pos_idx)
            stats["long_text"] += 1
        else:
            pos = alt
        neg = ""
        if neg_source == "desc":
            idx = pos_idx if aligned else self._fit([self.count.cost(s) for s in neg_desc], budget, rng)
            neg = " ".join(neg_desc[k] for k in idx)
            stats["neg_desc"] += 1
        elif neg_source == "tags":
            costs = [self.count.cost(t) + 1 for t in neg_tags]  # + the separator's comma
            idx = self._fit(costs, budget, rng)
            neg = TAG_JOIN.join(neg_tags[k] for k in idx)
            stats["neg_tags"] += 1
        # What the tokenizer will cut, measured on the final texts: counted, never silent.
        stats["truncated"] += sum(self.count(t) > self.context_length for t in (pos, neg) if t)
        return pos, neg

    def _fit(self, costs: list[int], budget: int, rng) -> list[int]:
        if self.cfg.text_fit == "sample":
            return fit_parts(costs, budget, rng, self.cfg.max_sentences)
        return list(range(min(len(costs), self.cfg.max_sentences or len(costs))))  # "truncate": leading parts
