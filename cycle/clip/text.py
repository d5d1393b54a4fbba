"""Turning a batch's texts into token tensors for the HQ-CLIP loss, and the STC tag vocabulary.

Per annotated sample (see `TextDrawer`), one uniform draw u picks the positive text:
- u < `loss.long_text_prob`: the long description (sentences of `desc`);
- next `loss.short_text_prob`: a short tag text, 1 to `loss.short_text_max_tags` of the sample's tags
  joined like "a, b and c" (class-like texts keep zero-shot prompts in the training distribution);
- else, and when the drawn source is empty, for a sample without annotation and in generation 0: the raw
  alt-text.
Negative (`loss.hni_negatives="paired"`, the paper's HNI): the minimal edit of THAT row's positive, part
by part: sentence k of `neg_desc` for sentence k of `desc`, `neg_tags[k]` for `tags[k]` (same indices,
same join, so a negative tag text differs from a positive one by its words only, never by its format);
none for an alt-text positive. A negative part identical to its positive part, or further from it than
`loss.neg_max_edit_words` (word-level edit distance: not a minimal edit, so possibly true), is replaced
by the positive part; a row whose negative has no edit left has none (`neg_valid` false). With
`loss.neg_repair: swap`, a description negative without any usable edit (identical, too far, or missing)
becomes a rule edit of the positive instead: one count, spatial or colour word swapped (`swap_edit`;
generic English, so it works on user data); with `neg_repair: tags`, one object the description names replaced
by its aligned negative tag (`tag_edit`: the annotator's own tag negatives, so object edits where its description
negatives, at the demo's size, are mostly identical or position swaps). Counted: `neg_desc` / `neg_tags`
(negatives drawn), `neg_same_as_pos` (the negative read like the positive), `neg_too_far` (dropped by the bound),
`neg_repaired` (rows given a rule edit).
`"mined"`: like "paired", but a description's negative sentences are other training images' positive sentences
that differ from the row's by one word (`negatives.neighbour_index`, built over the training set's descriptions;
never one of the row's own sentences); a sentence without such a neighbour stays as it is, so a row none of whose
drawn sentences has one reads like its positive and has no negative. The negatives are then texts the CLIP also
sees as positives, so how familiar a text is cannot tell a negative from a positive (the paired edits are mostly
texts no image is described by). Tag texts keep their paired `neg_tags`. The neighbour is drawn from its own stream,
so the positives are those of "paired".
`"independent"`: the negative source drawn by `loss.neg_tags_prob` whatever the positive (the old draw).
Long descriptions fit the text context by whole sentences (`loss.text_fit="sample"`: a random subset of
sentences that fits, kept in order; `"truncate"`: leading sentences, cut by the tokenizer); a paired
negative uses the positive's sentence indices. Every cut is counted in the batch stats (`truncated`).
Draws are a pure function of (seed, step, sample id): the same on any rank count, and on resume.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..config import LossConfig
from .negatives import EDGE_PUNCT, negative_part_kind, swap_edit, tag_edit, words_of

TAG_JOIN = ", "
TAG_LAST_JOIN = " and "
OPEN_CLIP_CONTEXT = 77  # open_clip's text context, for a tokenizer that does not say its own
START_END_TOKENS = 2  # every tokenized text carries a start and an end token
# Distinct texts whose token counts are kept: a run's texts repeat every epoch; the cap bounds the memory.
TOKEN_CACHE_SIZE = 200_000
# Counting with a tokenizer that always pads/cuts to a context: a context this many times the real one
# lets a long text show its full length.
COUNT_CONTEXT_FACTOR = 4
MINED_STREAM = 1  # the mined neighbour's draws: a stream of their own, so the positives are paired mode's


# ------------------------------------------------------------------------------------------ tags
def normalise_tag(tag: str) -> str:
    """Lower-case, collapse spaces, strip edge punctuation, and singularise the last word when easy."""
    words = re.sub(r"\s+", " ", str(tag).lower()).strip(EDGE_PUNCT).split(" ")
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
    counts: Counter = Counter()
    for tags in tag_lists:
        counts.update({t for t in (normalise_tag(x) for x in tags or []) if t})
    return rank_tags(counts, size, min_count)


def rank_tags(counts: Mapping[str, int], size: int, min_count: int = 1) -> list[str]:
    """`build_tag_vocab` from tag counts already made (normalised tags, once per sample)."""
    if size < 1:
        raise ValueError(f"tag vocabulary size must be >= 1, got {size}")
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


def tags_named_in(texts: Sequence[Sequence[str]], vocab: Sequence[str]) -> torch.Tensor:
    """(len(texts), len(vocab)) targets for held-out images: 1 where a vocabulary tag is named in one of
    the image's texts (whole words, every word singularised on both sides: "two dogs" names "dog")."""

    def words(text: str) -> str:
        return " " + " ".join(_singular(w) for w in re.findall(r"[\w'-]+", text.lower())) + " "

    tag_words = [words(t) for t in vocab]
    out = torch.zeros(len(texts), len(vocab))
    for i, group in enumerate(texts):
        joined = "|".join(words(t) for t in group)
        for k, tw in enumerate(tag_words):
            if tw.strip() and tw in joined:
                out[i, k] = 1.0
    return out


# ------------------------------------------------------------------------------------------ texts
def text_key(text: str) -> int:
    """A signed 64-bit key of a text as the tokenizer sees it (case and spacing ignored)."""
    norm = re.sub(r"\s+", " ", text).strip().lower()
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little", signed=True)


def join_tags(tags: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c": positive and negative tag texts share this one format."""
    tags = list(tags)
    if len(tags) <= 1:
        return "".join(tags)
    return TAG_JOIN.join(tags[:-1]) + TAG_LAST_JOIN + tags[-1]


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
        cfg: the loss section (the text draw's rates, `hni_negatives`, `neg_max_edit_words`, `max_sentences`,
            `text_fit`).
        tokenizer: the CLIP's open_clip tokenizer; `context_length` defaults to the tokenizer's.
        use_annotations: False in generation 0 (alt-text only, no negatives, no tags).
        negatives: tokenize negatives (HNI on); tag_vocab: STC vocabulary (STC on), else None.
        neighbours: `negatives.neighbour_index` of the training descriptions (`loss.hni_negatives: mined`).
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
        neighbours: Optional[Mapping[str, Sequence[str]]] = None,
    ):
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, int(seed)
        self.neighbours = neighbours or {}
        self.context_length = int(context_length or getattr(tokenizer, "context_length", OPEN_CLIP_CONTEXT))
        self.count = TokenCounter(tokenizer, self.context_length)
        # token rows per text: descriptions and alt-texts come back every epoch, and open_clip's tokenizer
        # (text cleaning + BPE per call) cost ~2.5% of a demo training step; a row depends on its text alone
        self.token_rows: dict[str, torch.Tensor] = {}
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
            row_seed = [self.seed, int(step), _id_entropy(ids[i])]
            use = self.use_annotations and annotated[i]
            pos, neg = self._draw_one(
                np.random.default_rng(row_seed),
                alts[i] or "",
                *((desc[i], neg_desc[i], tags[i], neg_tags[i]) if use else ([], [], [], [])),
                stats,
                row_seed=row_seed,
            )
            positives.append(pos)
            if self.negatives:
                ok = bool(neg) and text_key(neg) != text_key(pos)
                stats["neg_same_as_pos"] += int(bool(neg) and not ok)
                negatives.append(neg if ok else "")
                valid.append(ok)
        out = {
            "texts": self.tokenize(positives),
            "text_keys": torch.tensor([text_key(t) for t in positives], dtype=torch.long),
        }
        if self.negatives:
            out["neg_texts"] = self.tokenize(negatives)
            out["neg_valid"] = torch.tensor(valid, dtype=torch.bool)
            out["neg_keys"] = torch.tensor([text_key(t) for t in negatives], dtype=torch.long)
        if self.tag_vocab is not None:
            out["tag_targets"] = multi_hot([t if a else [] for t, a in zip(tags, annotated)], self.vocab_index)
        stats["samples"] = n
        out["stats"] = dict(stats)
        return out

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """`tokenizer(texts, context_length)`, row for row, with each text's row cached (TOKEN_CACHE_SIZE texts)."""
        rows: list = [self.token_rows.get(t) for t in texts]
        todo = [i for i, r in enumerate(rows) if r is None]
        if todo:
            fresh = self.tokenizer([texts[i] for i in todo], context_length=self.context_length)
            for i, row in zip(todo, fresh):
                rows[i] = row
                if len(self.token_rows) < TOKEN_CACHE_SIZE:
                    self.token_rows[texts[i]] = row.clone()  # not a view that keeps the batch alive
        return torch.stack(rows)

    def draw_source(self, u: float, desc: list, tags: list) -> str:
        """The positive's source for the uniform draw `u`: "desc", "tags" or "alt" (see the module doc)."""
        long_p, short_p = self.cfg.long_text_prob, self.cfg.short_text_prob
        if u < long_p:
            return "desc" if desc else "alt"
        if u < long_p + short_p:
            return "tags" if tags else "alt"
        return "alt"

    def _draw_one(
        self, rng, alt: str, desc: list, neg_desc: list, tags: list, neg_tags: list, stats: Counter, row_seed=()
    ):
        desc, neg_desc, tags, neg_tags = (list(x or []) for x in (desc, neg_desc, tags, neg_tags))
        source = self.draw_source(rng.random(), desc, tags) if (desc or tags) else "alt"
        paired = self.cfg.hni_negatives in ("paired", "mined")
        if self.negatives and source == "desc" and self.cfg.hni_negatives == "mined":
            neg_desc = self._mined_parts(desc, np.random.default_rng([*row_seed, MINED_STREAM]))
        # The negative's parts, aligned with the positive's when paired (none for an alt-text positive).
        neg_parts: list = []
        independent: Optional[str] = None
        if self.negatives and paired:
            neg_parts = {"desc": neg_desc, "tags": neg_tags}.get(source, [])
            pos_parts = desc if source == "desc" else tags
            if neg_parts and len(neg_parts) != len(pos_parts):
                stats["neg_unaligned"] += 1  # annotation parsing refuses this; a user file may not
                neg_parts = []
        elif self.negatives:
            independent = self._independent_source(rng, neg_desc, neg_tags)

        budget = self.context_length - START_END_TOKENS
        idx: list[int] = []
        if source == "desc":
            costs = [self.count.cost(p) for p in desc]
            if not neg_parts and independent == "desc" and len(neg_desc) == len(desc):
                neg_parts_fit = neg_desc
            else:
                neg_parts_fit = neg_parts
            if neg_parts_fit:  # one set of sentence indices must fit both texts
                costs = [max(c, self.count.cost(q)) for c, q in zip(costs, neg_parts_fit)]
            idx = self._fit(costs, budget, rng)
            pos = " ".join(desc[k] for k in idx)
            stats["long_text"] += 1
        elif source == "tags":
            costs = [self.count.cost(t) + 1 for t in tags]  # + the separator
            if neg_parts:
                costs = [max(c, self.count.cost(q) + 1) for c, q in zip(costs, neg_parts)]
            k_max = int(rng.integers(1, self.cfg.short_text_max_tags + 1))
            idx = fit_parts(costs, budget, rng, k_max)
            pos = join_tags(tags[k] for k in idx)
            stats["short_text"] += 1
        else:
            pos = alt

        neg = ""
        repair = self.negatives and paired and source == "desc" and self.cfg.neg_repair != "none"
        if neg_parts or repair:
            # the repair's draws come last: without it, every draw of the row is as before
            tag_pairs = (tags, neg_tags) if len(tags) == len(neg_tags) else ([], [])
            neg = self._paired_negative(source, idx, pos_parts, neg_parts, stats, rng, tag_pairs)
        elif independent:
            pos_idx = idx if source == "desc" else None
            neg = self._independent_negative(independent, pos_idx, desc, neg_desc, neg_tags, budget, rng)
            stats[f"neg_{independent}"] += 1
        # What the tokenizer will cut, measured on the final texts: counted, never silent.
        stats["truncated"] += sum(self.count(t) > self.context_length for t in (pos, neg) if t)
        return pos, neg

    def _mined_parts(self, desc: list, rng) -> list:
        """Per sentence of `desc`: a one-word neighbour from another training image (`self.neighbours`) that
        is none of the row's own sentences, drawn at random; the sentence itself where it has none."""
        own = {words_of(s) for s in desc}
        parts = []
        for sentence in desc:
            near = [n for n in self.neighbours.get(sentence, ()) if words_of(n) not in own]
            parts.append(near[int(rng.integers(len(near)))] if near else sentence)
        return parts

    def _paired_negative(
        self, source: str, idx: list[int], pos_parts: list, neg_parts: list, stats: Counter, rng, tag_pairs: tuple
    ) -> str:
        """The positive with each chosen part replaced by its edit, where the edit is a usable one; with
        `loss.neg_repair` "swap" or "tags", a description without any usable edit gets one rule edit instead
        (`negatives.swap_edit`; `negatives.tag_edit` from the row's aligned `tags`/`neg_tags` in `tag_pairs`)."""
        stats["neg_desc" if source == "desc" else "neg_tags"] += 1
        kinds = [
            negative_part_kind(pos_parts[k], neg_parts[k], self.cfg.neg_max_edit_words) if neg_parts else "none"
            for k in idx
        ]
        if source == "desc" and self.cfg.neg_repair != "none" and "edit" not in kinds:
            # no usable edit from the annotator: one rule edit of the positive (one word or name, still minimal)
            text = " ".join(pos_parts[k] for k in idx)
            repaired = swap_edit(text, rng) if self.cfg.neg_repair == "swap" else tag_edit(text, *tag_pairs, rng)
            if repaired:
                stats["neg_repaired"] += 1
                return repaired
        parts = [neg_parts[k] if kind == "edit" else pos_parts[k] for k, kind in zip(idx, kinds)]
        if "edit" not in kinds and "far" in kinds:
            stats["neg_too_far"] += 1  # not a minimal edit of this positive: possibly true, so not used
            return ""
        return " ".join(parts) if source == "desc" else join_tags(parts)

    def _independent_source(self, rng, neg_desc: list, neg_tags: list) -> Optional[str]:
        want_tags = rng.random() < self.cfg.neg_tags_prob
        if want_tags and neg_tags:
            return "tags"
        if neg_desc:
            return "desc"
        return "tags" if neg_tags else None

    def _independent_negative(self, source, pos_idx, desc, neg_desc, neg_tags, budget, rng) -> str:
        """The old draw: the negative's source whatever the positive; the sentences aligned when both are long."""
        if source == "desc":
            aligned = pos_idx is not None and len(neg_desc) == len(desc)
            idx = pos_idx if aligned else self._fit([self.count.cost(s) for s in neg_desc], budget, rng)
            return " ".join(neg_desc[k] for k in idx)
        idx = self._fit([self.count.cost(t) + 1 for t in neg_tags], budget, rng)
        return join_tags(neg_tags[k] for k in idx)

    def _fit(self, costs: list[int], budget: int, rng) -> list[int]:
        if self.cfg.text_fit == "sample":
            return fit_parts(costs, budget, rng, self.cfg.max_sentences)
        return list(range(min(len(costs), self.cfg.max_sentences or len(costs))))  # "truncate": leading parts
