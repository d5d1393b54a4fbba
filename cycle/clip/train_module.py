"""The module the trainer optimises: an open_clip CLIP plus, when STC is on, the tag head.

One `forward` gives everything `HQClipLoss` needs, so a DeepSpeed engine wraps a single module and the
feature cache stores one dict per micro-batch. Positive and negative texts go through the text tower in
one call; only usable negatives are encoded (the others stay zero rows, masked by the loss).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

# Outputs that are per-sample features (cached and concatenated across micro-batches); the rest
# (logit_scale) is recomputed with gradient every time.
FEATURE_KEYS = ("image_features", "text_features", "neg_text_features", "tag_logits")


class ClipWithTagHead(nn.Module):
    def __init__(self, clip: nn.Module, num_tags: int = 0, embed_dim: Optional[int] = None):
        super().__init__()
        self.clip = clip
        if num_tags > 0:
            embed_dim = embed_dim or _embed_dim(clip)
            # The head reads the unit-norm image embedding: STC shapes the same space that zero-shot uses.
            self.stc_head: Optional[nn.Linear] = nn.Linear(embed_dim, num_tags)
        else:
            self.stc_head = None

    def init_tag_prior(self, positive_rate: float) -> None:
        """Start every tag logit at the prior log-odds, so early steps don't just push all tags down."""
        if self.stc_head is not None:
            p = min(max(positive_rate, 1e-6), 0.5)
            nn.init.normal_(self.stc_head.weight, std=0.01)
            nn.init.constant_(self.stc_head.bias, math.log(p / (1 - p)))

    def forward(self, images: Tensor, texts: Tensor, neg_texts: Optional[Tensor] = None,
                neg_valid: Optional[Tensor] = None, **_unused) -> dict[str, Tensor]:
        image_features = self.clip.encode_image(images, normalize=True)
        n = texts.shape[0]
        out = {"image_features": image_features}
        if neg_texts is not None:
            idx = torch.nonzero(neg_valid, as_tuple=True)[0]
            feats = self.clip.encode_text(torch.cat([texts, neg_texts[idx]]), normalize=True)
            out["text_features"] = feats[:n]
            neg = feats.new_zeros((n, feats.shape[1]))
            out["neg_text_features"] = neg.index_copy(0, idx, feats[n:])
        else:
            out["text_features"] = self.clip.encode_text(texts, normalize=True)
        if self.stc_head is not None:
            out["tag_logits"] = self.stc_head(image_features)
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out


def _embed_dim(clip: nn.Module) -> int:
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, Tensor):
        return proj.shape[1]
    return int(clip.visual.output_dim)
