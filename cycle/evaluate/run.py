"""The eval stage: a CLIP checkpoint + evaluation sets -> a flat dict of metrics (and a JSON file).

Metric names are `<set>/<metric>`: `test_zeroshot/top1`, `test_retrieval/image_to_text_r1`,
`test_negatives/acc_object`, `val/retrieval_mean_r1` (what early stopping reads by default), plus
`<set>/n_images` and `<set>/n_texts`. Which metrics a set gets follows its annotations
(see `datasets.py`), not its name. A set's variants (the emoji-scenes held-out splits in other wordings)
are reported under their own names, `test_retrieval_reworded/image_to_text_r1` and so on, on the same
image embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..device import resolve_device
from ..files import write_json_atomic
from .datasets import EvalDataError, EvalSet, load_dataset, load_store_split
from .metrics import class_vectors, negative_metrics, retrieval_metrics, tag_metrics, zeroshot_metrics

log = logging.getLogger(__name__)

METRICS_JSON_INDENT = 1  # the layout metrics.json files have always had


@torch.no_grad()
def embed_images(model, preprocess, ev: EvalSet, batch_size: int, device, progress: bool = True) -> torch.Tensor:
    """Image features (not normalised) of every image of the set, in order."""
    out = []
    for start in tqdm(range(0, len(ev), batch_size), desc=f"{ev.name}: images", disable=not progress, leave=False):
        batch = torch.stack([preprocess(ev.image(i)) for i in range(start, min(start + batch_size, len(ev)))])
        out.append(model.encode_image(batch.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(
    model, tokenizer, texts: Sequence[str], batch_size: int, device, desc: str = "texts", progress: bool = True
) -> torch.Tensor:
    """Text features (not normalised), in order; each distinct text is encoded once."""
    unique = list(dict.fromkeys(texts))
    feats = []
    for start in tqdm(range(0, len(unique), batch_size), desc=desc, disable=not progress, leave=False):
        ids = tokenizer(unique[start : start + batch_size]).to(device)
        feats.append(model.encode_text(ids).float().cpu())
    table = torch.cat(feats) if feats else torch.empty(0)
    where = {t: i for i, t in enumerate(unique)}
    return table[[where[t] for t in texts]] if texts else table


def format_template(template: str, classname: str) -> str:
    """Templates may use `{}` (ours) or `{c}` (CLIP_benchmark's)."""
    return template.format(classname, c=classname)


def evaluate_set(
    model,
    tokenizer,
    preprocess,
    ev: EvalSet,
    cfg: EvalConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
    image_features: Optional[torch.Tensor] = None,
    tag_head: Optional[tuple] = None,
) -> dict[str, float]:
    """Every task the set supports, on one pass of image embeddings. Keys are not prefixed.

    `device` is where `model` already is (a torch device, or a setting such as "cpu" or "auto").
    `image_features`: the set's image embeddings when already computed (a variant shares its set's).
    `tag_head`: (STC head module, tag vocabulary) of a checkpoint trained with STC: on a set with texts,
    tag mAP and the STC term against the vocabulary tags its texts name (`text.tags_named_in`)."""
    if ev.labels is not None and not cfg.templates:  # load_config refuses this; an EvalConfig made in code may not
        raise EvalDataError("eval.templates is empty: zero-shot classification needs at least one")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    images = image_features
    if images is None:
        images = embed_images(model, preprocess, ev, cfg.batch_size, device, progress)
    out: dict[str, float] = {"n_images": len(ev)}
    if ev.labels is not None:
        prompts = [format_template(t, c) for c in ev.classes for t in cfg.templates]
        feats = embed_texts(model, tokenizer, prompts, cfg.batch_size, device, f"{ev.name}: classes", progress)
        classes = class_vectors(feats.reshape(len(ev.classes), len(cfg.templates), -1))
        index = {c: i for i, c in enumerate(ev.classes)}
        out.update(zeroshot_metrics(images, classes, torch.tensor([index[label] for label in ev.labels])))
        out["n_classes"] = len(ev.classes)
    if ev.captions is not None:
        texts = [c for caps in ev.captions for c in caps]
        owner = [i for i, caps in enumerate(ev.captions) for _ in caps]
        feats = embed_texts(model, tokenizer, texts, cfg.batch_size, device, f"{ev.name}: captions", progress)
        out.update(retrieval_metrics(images, feats, owner))
        out["n_texts"] = len(texts)
    if ev.positives is not None:
        negs = [(i, n["text"], n["edit"]) for i, row in enumerate(ev.negatives) for n in row]
        texts = list(ev.positives) + [t for _, t, _ in negs]
        feats = embed_texts(model, tokenizer, texts, cfg.batch_size, device, f"{ev.name}: negatives", progress)
        pos, neg = feats[: len(ev.positives)], feats[len(ev.positives) :]
        out.update(negative_metrics(images, pos, neg, [i for i, _, _ in negs], [e for _, _, e in negs]))
        out["n_negatives"] = len(negs)
    if tag_head is not None and (ev.captions is not None or ev.positives is not None):
        from ..clip.text import tags_named_in

        head, vocab = tag_head
        texts = [
            list(ev.captions[i] if ev.captions is not None else []) + ([ev.positives[i]] if ev.positives else [])
            for i in range(len(ev))
        ]
        with torch.no_grad():
            logits = head(torch.nn.functional.normalize(images.float(), dim=-1)).cpu()
        out.update(tag_metrics(logits, tags_named_in(texts, vocab)))
    return out


def evaluate_clip(
    clip_dir: str | Path,
    store,
    splits: Optional[Iterable[str]],
    cfg: EvalConfig,
    samples_version: int | str | None = None,
    out_json: str | Path | None = None,
    datasets: Iterable[str | Path] = (),
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Evaluate a CLIP checkpoint on store splits and user datasets; returns flat `<set>/<metric>` numbers.

    `splits=None` means `cfg.select_split` + `cfg.splits`, skipping those the store lacks; a split named
    explicitly must exist. `datasets` are paths (see `load_dataset`), named by their file stem.
    `out_json` receives the same dict, written atomically. `device` is the run's `device` setting
    ("auto", "cpu", "cuda", "cuda:1"): the model is loaded there and every batch goes there.
    """
    from ..clip.saved import load_clip

    device = resolve_device(device)
    sets: list[EvalSet] = []
    explicit = splits is not None
    names = list(dict.fromkeys(splits if explicit else [cfg.select_split, *cfg.splits]))
    if names and store is None:
        if explicit:
            raise EvalDataError(f"splits {names} need a run's store")
        names = []
    for split in names:
        try:
            sets.append(load_store_split(store, split, samples_version))
        except EvalDataError as err:
            if explicit or "has no rows" not in str(err):
                raise
            log.info("eval: %s; skipped", err)
    for path in datasets:
        ev = load_dataset(path)
        if {ev.name} & {v.name for s in sets for v in (s, *s.variants)}:
            raise EvalDataError(f"two evaluation sets are named '{ev.name}'")
        sets.append(ev)
    if not sets:
        raise EvalDataError("nothing to evaluate: no split of the store and no dataset given")

    model, preprocess, tokenizer, extras = load_clip(clip_dir, device=device)
    tag_head = _tag_head(extras)
    metrics: dict[str, float] = {}
    for ev in sets:
        images = embed_images(model, preprocess, ev, cfg.batch_size, device, progress)
        for part in (ev, *ev.variants):
            head = tag_head if part is ev else None  # tag metrics once per set: its images are the variants' too
            for key, value in evaluate_set(
                model, tokenizer, preprocess, part, cfg, device, progress, images, head
            ).items():
                metrics[f"{part.name}/{key}"] = value
    if out_json is not None:
        write_json_atomic(out_json, metrics, indent=METRICS_JSON_INDENT)
    return metrics


def _tag_head(extras: dict) -> Optional[tuple]:
    """The STC head and vocabulary a checkpoint carries (`stc_head`, `tag_vocab`), on the CPU; else None."""
    from ..clip.model import make_tag_head, tag_head_kind

    state, vocab = extras.get("stc_head"), extras.get("tag_vocab")
    if not state or not vocab:
        return None
    state = {k: v.float().cpu() for k, v in state.items()}
    head = make_tag_head(tag_head_kind(state), state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval(), list(vocab)
