"""The HQ-CLIP loss: contrastive (CLIP), hard negative identification (HNI), short-tag classification (STC).

The paper (arXiv 2507.22431) names the three terms but publishes no equations; the ones below are OURS.
Notation for one global batch of N samples spread over W ranks (n = N / W rows on this rank):
x_i image embedding, y_i positive text embedding, y_i^- negative text embedding (all unit-norm),
s = exp(t) the learnable logit scale, v_i in {0, 1} "sample i has a usable negative", T_i its tag set.

  L_clip = 1/2N sum_i [ CE_j(s x_i.y_j ; i) + CE_j(s y_i.x_j ; i) ]          (open_clip ClipLoss)

  L_hni, mode "batch" (NegCLIP-style extra columns, image -> text only; text -> image is unchanged):
      L_hni = 1/|V| sum_{i in V} CE( [s x_i.y_1 .. s x_i.y_N, s x_i.y_1^- .. s x_i.y_N^-] ; i )
      where column y_k^- is dropped when v_k = 0, or for row i when y_k^- is the same text as y_i.
  L_hni, mode "pair" (2-way softmax of the positive against its own negative):
      L_hni = 1/|V| sum_{i in V} -log( e^{s x_i.y_i} / (e^{s x_i.y_i} + e^{s x_i.y_i^-}) )
  V = {i : v_i = 1}. With `loss.hni_norm: batch` (the default) the 1/|V| above is 1/N: a row with a negative
  then weighs as much in L_hni as in L_clip, however few rows have one. y_i^- is the minimal edit of row i's
  own positive (text.py: the aligned neg_desc sentences for a description,
  the aligned neg_tags for a tag text, none for alt-text); a negative that
  reads like its positive, or is no minimal edit of it, is not usable (the text drawer sets v_i = 0).

  Direction weights (per row i in V, in units of one cross-entropy over the batch):
      mode    image->text, in-batch texts         image->text, own negative       text->image
      batch   1/2 (L_clip) + lambda_hni (L_hni)   lambda_hni (inside L_hni's CE)  1/2 (L_clip)
      pair    1/2 (L_clip)                        lambda_hni (2-way CE)           1/2 (L_clip)
  So "batch" counts the image->text contrast twice (L_clip without, L_hni with the negative columns):
  at lambda_hni = 1 a row with a negative weighs image->text 3x text->image; "pair" adds only the
  positive-vs-own-negative decision and leaves L_clip's balance alone. Rows outside V get L_clip only.

  L_stc = 1/|R| sum_{i in R} 1/K sum_k BCE( z_ik, [tag k in T_i] ) over the K-tag vocabulary,
      R = {i : T_i has a vocabulary tag}; z_i the tag head on x_i (model.py, `loss.stc_head`):
      "cosine" z_ik = s_t cos(x_i, w_k) + b_k (s_t learnable, init 10; b_k at tag k's prior log-odds),
      "linear" z_i = W x_i + b;
      "text" z_ik = s_t cos(x_i, T(tag_k)) + b_k, T the CLIP's own text tower on tag k's text: the rows are
      what zero-shot reads (a class name's text embedding), and L_stc's gradient reaches the text tower.

  L = L_clip + lambda_hni L_hni + lambda_stc L_stc

Each rank computes its n local rows against the gathered global batch (gather with gradient, like
open_clip's `local_loss=True, gather_with_grad=True`); masked means are normalised by the global count
and scaled by W, so the average over ranks (what DeepSpeed's gradient averaging computes) is exactly the
global loss above. The returned terms are already weighted; a zero weight means the term is not computed
and not returned. The clamp of t at ln(100) is the trainer's job, after the optimizer step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along the batch; backward sums every rank's gradient and keeps this rank's rows.

    (All-reduce rather than reduce-scatter: every backend has it, gloo included.)
    """

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_with_grad(t: Tensor) -> Tensor:
    return _AllGatherWithGrad.apply(t)


def _gather_no_grad(t: Tensor) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def _global_sum(value: Tensor) -> Tensor:
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value


class HQClipLoss(nn.Module):
    """Callable on model outputs; returns `{"clip_loss", "hni_loss"?, "stc_loss"?}` (weighted terms).

    `hni_weight` / `stc_weight` override the config's weights (generation 0 turns both off).
    `cfg.hni_mode` is "batch" or "pair": config validation (`loss.hni_mode`) refuses anything else.
    """

    def __init__(
        self,
        cfg: LossConfig,
        rank: int = 0,
        world_size: int = 1,
        hni_weight: Optional[float] = None,
        stc_weight: Optional[float] = None,
    ):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.hni_mode, self.hni_norm = cfg.hni_mode, cfg.hni_norm
        self.hni_weight = float(cfg.hni_weight if hni_weight is None else hni_weight)
        self.stc_weight = float(cfg.stc_weight if stc_weight is None else stc_weight)

    @property
    def uses_negatives(self) -> bool:
        return self.hni_weight != 0.0

    @property
    def uses_tags(self) -> bool:
        return self.stc_weight != 0.0

    # ------------------------------------------------------------------------------------------ terms
    def _masked_mean(self, per_row: Tensor, valid: Tensor, over_batch: bool = False) -> Tensor:
        """Sum over this rank's valid rows / global valid count (or the global batch size when
        `over_batch`), times W (see the module doc)."""
        valid = valid.to(per_row.dtype)
        local_sum = (per_row * valid).sum()
        count = torch.ones_like(valid).sum() if over_batch else valid.sum()
        if self.world_size > 1:
            count = _global_sum(count)
        return local_sum * self.world_size / count.clamp(min=1.0)

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        neg_text_features: Optional[Tensor] = None,
        neg_valid: Optional[Tensor] = None,
        text_keys: Optional[Tensor] = None,
        neg_keys: Optional[Tensor] = None,
        tag_logits: Optional[Tensor] = None,
        tag_targets: Optional[Tensor] = None,
        **_unused,
    ) -> dict[str, Tensor]:
        n = image_features.shape[0]
        # The softmax and its log in fp32 even when the towers run in bf16.
        image_features, text_features = image_features.float(), text_features.float()
        logit_scale = logit_scale.float()
        if self.world_size > 1:
            all_image, all_text = _gather_with_grad(image_features), _gather_with_grad(text_features)
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logit_scale * text_features @ image_features.T
        labels = torch.arange(n, device=image_features.device) + n * self.rank
        losses = {
            "clip_loss": (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        }

        if self.uses_negatives:
            if neg_text_features is None or neg_valid is None:
                raise ValueError("HNI is on (loss.hni_weight != 0) but the batch has no negative texts")
            neg = neg_text_features.float()
            neg_valid = neg_valid.bool()
            if self.hni_mode == "pair":
                pos_logit = logit_scale * (image_features * text_features).sum(-1)
                neg_logit = logit_scale * (image_features * neg).sum(-1)
                per_row = F.cross_entropy(
                    torch.stack([pos_logit, neg_logit], 1),
                    torch.zeros(n, dtype=torch.long, device=neg.device),
                    reduction="none",
                )
            else:
                per_row = self._batch_hni_rows(
                    image_features, logits_per_image, logit_scale, neg, neg_valid, text_keys, neg_keys, labels
                )
            losses["hni_loss"] = self.hni_weight * self._masked_mean(
                per_row, neg_valid, over_batch=self.hni_norm == "batch"
            )

        if self.uses_tags:
            if tag_logits is None or tag_targets is None:
                raise ValueError("STC is on (loss.stc_weight != 0) but the batch has no tag logits / targets")
            targets = tag_targets.float()
            per_row = F.binary_cross_entropy_with_logits(tag_logits.float(), targets, reduction="none").mean(-1)
            losses["stc_loss"] = self.stc_weight * self._masked_mean(per_row, targets.sum(-1) > 0)
        return losses

    def _batch_hni_rows(
        self, image_features, logits_per_image, logit_scale, neg, neg_valid, text_keys, neg_keys, labels
    ) -> Tensor:
        if self.world_size > 1:
            all_neg = _gather_with_grad(neg)
            all_valid = _gather_no_grad(neg_valid.to(torch.uint8)).bool()
            all_neg_keys = _gather_no_grad(neg_keys) if neg_keys is not None else None
        else:
            all_neg, all_valid, all_neg_keys = neg, neg_valid, neg_keys
        neg_logits = logit_scale * image_features @ all_neg.T
        drop = ~all_valid.unsqueeze(0).expand_as(neg_logits)
        if text_keys is not None and all_neg_keys is not None:
            # another sample's negative that reads exactly like this row's positive is not a negative here
            drop = drop | (text_keys.unsqueeze(1) == all_neg_keys.unsqueeze(0))
        neg_logits = neg_logits.masked_fill(drop, float("-inf"))
        return F.cross_entropy(torch.cat([logits_per_image, neg_logits], 1), labels, reduction="none")


def reduce_for_logging(losses: dict[str, Tensor], world_size: int) -> dict[str, float]:
    """The global value of each term (the mean of the per-rank terms), for logs and progress bars."""
    names = sorted(losses)
    values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
    if world_size > 1:
        values = _global_sum(values) / world_size
    return {k: float(v) for k, v in zip(names, values)}
