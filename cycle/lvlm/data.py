"""Training examples for the two LVLM stages, read from pinned store versions, and their batches.

An example is (image, input text, target text). The input is what annotation will feed the model:
`schema.model_input(schema.build_prompt(alt_text))` for SFT, the bare image placeholder for alignment;
the processor expands `<image>` to the tower's token count exactly as at annotation time. Labels are
-100 on the input and on padding: the loss covers the target and its closing eos only.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from PIL import Image

from ..annotate.schema import FORMULA_KEYS, IMAGE_TOKEN, build_prompt, model_input, to_target_json, validate
from ..config import EmojiScenesConfig
from ..store import COLUMN_SCAN_ROWS, USABLE, Store
from .common import LVLMError

log = logging.getLogger(__name__)

ALIGN_INPUT = f"{IMAGE_TOKEN}\n"  # stage 1 shows the image alone; the answer is its description
IDS_PER_QUERY = 1000  # ids per `id IN (...)` filter: bounded filter strings, few queries
SHUFFLE_SEED_STRIDE = 1_000_003  # epoch e of seed s shuffles with s * 1_000_003 + e (a prime: distinct per (s, e))


@dataclass
class Example:
    id: str
    image: bytes
    alt_text: str
    target: str  # stage 1: the description; stage 2: the formulas' compact JSON
    record: Optional[dict] = None  # stage 2: the four formulas
    meta: Optional[str] = field(default=None, repr=False)
    source: str = "seed"  # where the target comes from: "seed", "previous" (best annotations), "alt_text"


def samples_by_id(
    store: Store, samples_version, ids, columns=("id", "image", "alt_text", "meta"), chunk: int = IDS_PER_QUERY
) -> dict[str, dict]:
    """The `samples` rows of `ids` at a version, fetched by filter in chunks (never the whole table)."""
    return store.rows_by_id("samples", ids, list(columns), version=samples_version, chunk=chunk)


def teacher_records(store: Store, teacher_version) -> list[dict]:
    recs = store.read("teacher", ["id", *FORMULA_KEYS], version=teacher_version).to_pylist()
    bad = [(r["id"], validate({k: r[k] for k in FORMULA_KEYS})) for r in recs]
    bad = [(i, p) for i, p in bad if p]
    if bad:
        raise LVLMError(f"teacher table has {len(bad)} invalid records, e.g. '{bad[0][0]}': {'; '.join(bad[0][1])}")
    return recs


def align_examples(store: Store, samples_version, teacher_version, extra_ids=None, extra_records=None) -> list[Example]:
    """(image -> description) pairs: each seed row's `desc` sentences joined; with `extra_records` (id +
    `desc`, e.g. the previous generation's best annotations), theirs, for ids that are not seeds; with
    `extra_ids`, those samples with their own alt-text as the caption (LLaVA's stage 1 used filtered web
    captions)."""
    recs = [(r, "seed") for r in teacher_records(store, teacher_version)]
    seen = {r["id"] for r, _ in recs}
    for r in extra_records or ():
        if r["id"] not in seen and r.get("desc"):
            seen.add(r["id"])
            recs.append((r, "previous"))
    extra_ids = set(extra_ids or ()) - seen
    samples = samples_by_id(store, samples_version, seen | extra_ids)
    out = [
        Example(
            r["id"],
            samples[r["id"]]["image"],
            samples[r["id"]]["alt_text"] or "",
            " ".join(r["desc"]),
            meta=samples[r["id"]]["meta"],
            source=source,
        )
        for r, source in recs
        if r["id"] in samples
    ]
    out += [
        Example(
            i,
            samples[i]["image"],
            samples[i]["alt_text"],
            samples[i]["alt_text"],
            meta=samples[i]["meta"],
            source="alt_text",
        )
        for i in sorted(extra_ids)
        if i in samples and (samples[i]["alt_text"] or "").strip()
    ]
    _check_found(out, len(recs) + len(extra_ids), "alignment")
    return out


def alt_text_caption_ids(
    store: Store, samples_version, teacher_version, share: float, seed: int, batch_size: int = COLUMN_SCAN_ROWS
) -> list[str]:
    """A seeded `share` of the non-seed training samples with a non-empty alt-text: extra alignment data
    captioned by that alt-text (noisy, like LLaVA stage 1's web captions, but 2-3x the seed set's images).

    Each such sample is drawn with probability `share` by a hash of (seed, id) alone (`_drawn`), in one
    batched scan: no list of every id, and a sample's draw does not depend on the other rows."""
    if share <= 0:
        return []
    out: list[str] = []
    for rb in store.scan("samples", ["id", "alt_text"], "split = 'train'", samples_version, batch_size):
        drawn = [
            i
            for i, alt in zip(rb.column("id").to_pylist(), rb.column("alt_text").to_pylist())
            if (alt or "").strip() and _drawn(f"align-alt-text:{seed}:{i}", share)
        ]
        seeds = store.present("teacher", drawn, version=teacher_version)
        out += [i for i in drawn if i not in seeds]
    return sorted(out)


def _drawn(key: str, share: float) -> bool:
    """True for a `share` of keys: the key's 64-bit hash below `share` of the range (seeded by the key)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") < share * 2**64


def sft_examples(store: Store, samples_version, teacher_version, extra_records=None) -> list[Example]:
    """(image + alt-text -> four formulas) for every seed row, then `extra_records` (dicts with `id` and
    the four formulas, e.g. the previous generation's best annotations) whose ids are not seeds."""
    recs = teacher_records(store, teacher_version)
    seen = {r["id"] for r in recs}
    n_seeds = len(recs)
    for r in extra_records or ():
        problems = validate({k: r.get(k) for k in FORMULA_KEYS})
        if problems:
            raise LVLMError(f"extra SFT record '{r.get('id')}' is invalid: {'; '.join(problems)}")
        if r["id"] not in seen:
            seen.add(r["id"])
            recs.append(r)
    samples = samples_by_id(store, samples_version, seen)
    out = []
    for i, r in enumerate(recs):
        s = samples.get(r["id"])
        if s is not None:
            record = {k: list(r[k]) for k in FORMULA_KEYS}
            out.append(
                Example(
                    r["id"],
                    s["image"],
                    s["alt_text"] or "",
                    to_target_json(record),
                    record,
                    s["meta"],
                    source="seed" if i < n_seeds else "previous",
                )
            )
    _check_found(out, len(recs), "SFT")
    return out


def _check_found(out: list, wanted: int, what: str) -> None:
    if not out:
        raise LVLMError(f"no {what} examples: the teacher table is empty or its ids are not in the samples version")
    for e in out:  # a broken image fails here, named, rather than in the middle of training
        try:
            with Image.open(io.BytesIO(e.image or b"")) as im:
                im.verify()
        except Exception as err:
            raise LVLMError(
                f"{what} example '{e.id}': its image does not decode ({type(err).__name__}: {err})"
            ) from None
    if len(out) < wanted:
        log.warning("%s: %d of %d ids have no sample row at this version; skipped", what, wanted - len(out), wanted)


def decode(image: bytes) -> Image.Image:
    return Image.open(io.BytesIO(image)).convert("RGB")


class Batches:
    """`batches(epoch)`: the batches of one epoch, in an order that is a pure function of (seed, epoch).

    `truncated` collects the indices of examples whose sequence lost its end to `max_length` (filled as
    batches are made: read it after an epoch).
    """

    def __init__(
        self,
        examples: list[Example],
        processor,
        batch_size: int,
        seed: int,
        max_length: int,
        input_text: Callable[[Example, int], str],
    ):
        self.examples, self.processor, self.batch_size = examples, processor, batch_size
        self.seed, self.max_length, self.input_text = seed, max_length, input_text
        tokenizer = processor.tokenizer
        self.targets = [
            tokenizer(e.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for e in examples
        ]
        self.steps = math.ceil(len(examples) / batch_size)
        self.truncated: set[int] = set()

    def __call__(self, epoch: int) -> Iterator[dict]:
        examples, tokenizer, targets = self.examples, self.processor.tokenizer, self.targets
        order = list(range(len(examples)))
        random.Random(self.seed * SHUFFLE_SEED_STRIDE + epoch).shuffle(order)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.processor(
                images=[decode(examples[i].image) for i in idx],
                text=[self.input_text(examples[i], epoch) for i in idx],
                return_tensors="pt",
                padding=True,
            )
            rows, labels = [], []
            for ids, keep, i in zip(enc["input_ids"], enc["attention_mask"], idx):
                prompt_ids = ids[keep.bool()].tolist()
                seq = prompt_ids + targets[i]
                lab = [-100] * len(prompt_ids) + targets[i]
                if len(seq) > self.max_length:
                    self.truncated.add(i)
                    seq, lab = seq[: self.max_length], lab[: self.max_length]
                rows.append(seq)
                labels.append(lab)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            label_t = torch.full((len(rows), width), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, (r, lab) in enumerate(zip(rows, labels)):
                input_ids[j, : len(r)], label_t[j, : len(r)], mask[j, : len(r)] = (
                    torch.tensor(r),
                    torch.tensor(lab),
                    1,
                )
            yield {
                "input_ids": input_ids,
                "attention_mask": mask,
                "labels": label_t,
                "pixel_values": enc["pixel_values"],
            }


def make_batches(
    examples: list[Example],
    processor,
    batch_size: int,
    seed: int,
    max_length: int,
    input_text: Callable[[Example, int], str],
) -> tuple[Batches, int]:
    """(`Batches`, steps per epoch). `input_text(example, epoch)` gives the model input (it may change per
    epoch: fresh alt-text noise); sequences longer than `max_length` lose their end (`Batches.truncated`)."""
    batches = Batches(examples, processor, batch_size, seed, max_length, input_text)
    return batches, batches.steps


def sft_input(
    alt_text_fn: Optional[Callable[[Example, int], Optional[str]]] = None,
    render: Callable[[str], str] = model_input,
):
    """Stage 2 input: the annotation prompt around the alt-text (fresh per epoch when `alt_text_fn` gives one),
    rendered by `render` (`schema.render_input` with the LLaVA's processor: what annotation feeds it)."""

    def text(e: Example, epoch: int) -> str:
        alt = alt_text_fn(e, epoch) if alt_text_fn else None
        return render(build_prompt(e.alt_text if alt is None else alt))

    return text


def emoji_alt_text_fn(cfg: EmojiScenesConfig, seed: int) -> Callable[[Example, int], Optional[str]]:
    """Fresh web-like alt-text for emoji-scenes rows, drawn again every epoch from the scene graph with
    the dataset's own noise (`cycle.data.emoji.altnoise`). Epoch 0 and rows without a scene keep theirs."""
    from ..data.emoji.altnoise import corrupt
    from ..data.emoji.vocab import load_vocab

    vocab = load_vocab(cfg.vocab_size)

    def fresh(e: Example, epoch: int) -> Optional[str]:
        scene = json.loads(e.meta).get("scene") if e.meta and epoch > 0 else None
        if not scene:
            return None
        rng = random.Random(f"{seed}:{e.id}:{epoch}")
        return corrupt(scene, vocab, cfg.alt_noise, rng, cfg.max_count)[0]

    return fresh


def align_input(e: Example, epoch: int) -> str:
    return ALIGN_INPUT


def best_previous_annotations(
    store: Store,
    annotations_version,
    generation: int,
    share: float,
    fit: Callable[[list[dict]], list[Optional[float]]],
    batch_size: int = COLUMN_SCAN_ROWS,
) -> list[dict]:
    """The `share` of generation `generation`'s usable annotations (`store.USABLE`) that `fit` rates best,
    best first (ties by id), as dicts of id + the four formulas. `fit(rows)` rates a batch of such dicts
    (None: not a candidate, e.g. a seed image or an unreadable one); the count kept is `share` of all usable
    rows. Rows are scanned in batches and the best kept in a heap: memory holds the answer, not the
    generation."""
    if share <= 0:
        return []
    where = f"generation = {int(generation)} AND {USABLE}"
    keep = math.ceil(share * store.count("annotations", where, annotations_version))
    columns = ["id", *FORMULA_KEYS]

    def rated():  # (-rating, id, row): the smallest are the best, a tie goes to the smaller id
        for rb in store.scan("annotations", columns, where, annotations_version, batch_size):
            rows = rb.to_pylist()
            yield from ((-r, row["id"], row) for r, row in zip(fit(rows), rows) if r is not None)

    return [{k: row[k] for k in columns} for _, _, row in heapq.nsmallest(keep, rated())]


def clip_fit(clip_dir, store: Store, samples_version, teacher_version, device: str = "cpu"):
    """`fit` for `best_previous_annotations`: the CLIP in `clip_dir`'s mean cos(image, desc sentence)
    (`annotate.score.ClipScorer.fit`); seed images (already in the LVLM's data) are not candidates."""
    from ..annotate.score import ClipScorer

    scorer = ClipScorer(clip_dir, device=device)

    def fit(rows: list[dict]) -> list[Optional[float]]:
        ids = [r["id"] for r in rows]
        seeds = store.present("teacher", ids, teacher_version)
        images = samples_by_id(store, samples_version, set(ids) - seeds, ("id", "image"))
        picked = [r if r["id"] in images else None for r in rows]
        return scorer.fit([images[r["id"]]["image"] if r else None for r in picked], picked)

    return fit
