"""Evaluation metrics as pure functions of embeddings (no model, no data loading).

The definitions follow CLIP_benchmark's (the tests check equality on the same embeddings):
- zero-shot: a class vector is the mean of its L2-normalised template embeddings, renormalised; top-k
  accuracy of the image's cosine similarities; mean per-class recall over the classes that occur.
- retrieval: recall@k as in CLIP papers: a query counts as a hit when at least one of its matches is
  among its k nearest; text->image per caption, image->text per image (several captions per image).
- negatives (ours): for each (image, negative) pair, does the image sit closer to its positive text than
  to that negative? Reported overall, per edit type, and per image (positive beats all its negatives).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


def class_vectors(template_embeddings: torch.Tensor) -> torch.Tensor:
    """(C classes, T templates, D) text embeddings -> (C, D) unit class vectors."""
    if template_embeddings.ndim != 3:
        raise ValueError(f"expected (classes, templates, dim) embeddings, got shape {tuple(template_embeddings.shape)}")
    mean = F.normalize(template_embeddings.float(), dim=-1).mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


def zeroshot_metrics(
    image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, targets: torch.Tensor
) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean per-class recall. top5 is left out with fewer than 5 classes."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    n, c = image_embeddings.shape[0], class_embeddings.shape[0]
    if n == 0 or c == 0:
        raise ValueError("zero-shot metrics need at least one image and one class")
    if targets.shape != (n,) or int(targets.min()) < 0 or int(targets.max()) >= c:
        raise ValueError(f"targets must be {n} class indices in [0, {c})")
    logits = F.normalize(image_embeddings.float(), dim=-1) @ class_embeddings.float().t()
    ks = (1, 5) if c >= 5 else (1,)
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    hits = top.eq(targets[:, None])
    out = {f"top{k}": _share(hits[:, :k].any(dim=1)) for k in ks}
    pred = logits.argmax(dim=1)
    recalls = [_share(pred[targets == cls] == cls) for cls in targets.unique().tolist()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def _recall_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """Share of rows (queries) with at least one positive among their top-k columns."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    return _share(positives.gather(1, top).any(dim=1))


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_image_index: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """Recall@k both ways. `text_image_index[j]` is the image that caption j describes.

    Keys: `image_to_text_r{k}` (an image finds one of its captions), `text_to_image_r{k}` (a caption
    finds its image), `retrieval_mean_r1` (mean of the two R@1), `retrieval_mean` (mean of all).
    """
    index = torch.as_tensor(text_image_index, dtype=torch.long)
    n_img, n_txt = image_embeddings.shape[0], text_embeddings.shape[0]
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval metrics need at least one image and one caption")
    if index.shape != (n_txt,) or int(index.min()) < 0 or int(index.max()) >= n_img:
        raise ValueError(f"text_image_index must give an image in [0, {n_img}) for each of {n_txt} captions")
    scores = F.normalize(text_embeddings.float(), dim=-1) @ F.normalize(image_embeddings.float(), dim=-1).t()
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(n_txt), index] = True
    out = {}
    for k in ks:
        out[f"image_to_text_r{k}"] = _recall_at_k(scores.t(), positives.t(), k)
        out[f"text_to_image_r{k}"] = _recall_at_k(scores, positives, k)
    out["retrieval_mean_r1"] = (out["image_to_text_r1"] + out["text_to_image_r1"]) / 2 if 1 in ks else float("nan")
    out["retrieval_mean"] = sum(out[f"{d}_r{k}"] for d in ("image_to_text", "text_to_image") for k in ks) / (
        2 * len(ks)
    )
    return out


def negative_metrics(
    image_embeddings: torch.Tensor,
    positive_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    negative_image_index: Sequence[int] | torch.Tensor,
    negative_edits: Sequence[str],
) -> dict[str, float]:
    """Positive-vs-negative discrimination. Row i of `positive_embeddings` belongs to image i; negative j
    belongs to image `negative_image_index[j]` and was made by edit `negative_edits[j]`.

    Keys: `acc` (share of (image, negative) pairs won: sim(image, positive) > sim(image, negative); a tie
    is a loss), `acc_<edit>` per edit type, `acc_all` (share of images that beat every negative).
    """
    index = torch.as_tensor(negative_image_index, dtype=torch.long)
    n_img, n_neg = image_embeddings.shape[0], negative_embeddings.shape[0]
    if positive_embeddings.shape[0] != n_img:
        raise ValueError("one positive text per image is required")
    if n_neg == 0:
        raise ValueError("negative metrics need at least one negative")
    if index.shape != (n_neg,) or len(negative_edits) != n_neg or int(index.min()) < 0 or int(index.max()) >= n_img:
        raise ValueError(f"each of the {n_neg} negatives needs an image in [0, {n_img}) and an edit type")
    img = F.normalize(image_embeddings.float(), dim=-1)
    pos_sim = (img * F.normalize(positive_embeddings.float(), dim=-1)).sum(-1)
    neg_sim = (img[index] * F.normalize(negative_embeddings.float(), dim=-1)).sum(-1)
    won = pos_sim[index] > neg_sim
    out = {"acc": _share(won)}
    by_edit: dict[str, list[int]] = defaultdict(list)
    for j, edit in enumerate(negative_edits):
        by_edit[_edit_key(edit)].append(j)
    for edit, rows in sorted(by_edit.items()):
        out[f"acc_{edit}"] = _share(won[rows])
    losses = torch.zeros(n_img, dtype=torch.long).index_add_(0, index, (~won).long())
    has_neg = torch.zeros(n_img, dtype=torch.bool).index_fill_(0, index.unique(), True)
    out["acc_all"] = _share(losses[has_neg] == 0)
    return out


def _share(flags: torch.Tensor) -> float:
    """Share of true flags as an exact ratio of counts (a float32 mean would round it)."""
    return int(flags.sum()) / flags.numel()


def _edit_key(edit: str) -> str:
    """Edit types become metric-name suffixes: lower case, [a-z0-9_]."""
    key = "".join(ch if ch.isalnum() else "_" for ch in str(edit or "unknown").strip().lower()).strip("_")
    return key or "unknown"


# ----------------------------------------------------------------------------------------------- tags
def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """AP of one ranking: the mean over positives of the precision at each positive's rank (ties: as sorted)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    hits = positives.bool()[order].float()
    if hits.sum() == 0:
        raise ValueError("average precision needs at least one positive")
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def tag_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """STC on held-out images: mean AP over the tags that have a positive (`tag_map`, `tag_map_tags`), and
    the STC term (BCE averaged over tags, then over images with a positive tag: `stc_loss`)."""
    logits, targets = logits.float(), targets.float()
    present = [k for k in range(targets.shape[1]) if targets[:, k].any()]
    rows = targets.sum(1) > 0
    if not present:
        return {"tag_map_tags": 0}
    bce = F.binary_cross_entropy_with_logits(logits[rows], targets[rows], reduction="none").mean(1)
    return {
        "tag_map": sum(average_precision(logits[:, k], targets[:, k]) for k in present) / len(present),
        "tag_map_tags": len(present),
        "stc_loss": float(bce.mean()),
    }
