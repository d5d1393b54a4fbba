"""The module the trainer optimises: an open_clip CLIP plus, when STC is on, the tag head.

One `forward` gives everything `HQClipLoss` needs, so a DeepSpeed engine wraps a single module and the
feature cache stores one dict per micro-batch. Positive and negative texts go through the text tower in
one call; only usable negatives are encoded (the others stay zero rows, masked by the loss).

Texts are mostly shorter than the context (alt-text, tags): `encode_text` runs the text tower on two
length buckets, each cut after its longest text's last token. With a causal text tower pooled at the
end-of-text token this changes nothing (no position attends to a later one) but skips the padding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Outputs that are per-sample features (cached and concatenated across micro-batches); the rest
# (logit_scale) is recomputed with gradient every time.
FEATURE_KEYS = ("image_features", "text_features", "neg_text_features", "tag_logits")


class ClipWithTagHead(nn.Module):
    def __init__(self, clip: nn.Module, num_tags: int = 0, embed_dim: Optional[int] = None,
                 cut_text_padding: bool = True):
        super().__init__()
        self.clip = clip
        self.cut_text_padding = cut_text_padding
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

    def _encode_text(self, tokens: Tensor) -> Tensor:
        if self.cut_text_padding:
            return encode_text(self.clip, tokens)
        return self.clip.encode_text(tokens, normalize=True)

    def forward(self, images: Tensor, texts: Tensor, neg_texts: Optional[Tensor] = None,
                neg_valid: Optional[Tensor] = None, **_unused) -> dict[str, Tensor]:
        image_features = self.clip.encode_image(images, normalize=True)
        n = texts.shape[0]
        out = {"image_features": image_features}
        if neg_texts is not None:
            idx = torch.nonzero(neg_valid, as_tuple=True)[0]
            feats = self._encode_text(torch.cat([texts, neg_texts[idx]]))
            out["text_features"] = feats[:n]
            neg = feats.new_zeros((n, feats.shape[1]))
            out["neg_text_features"] = neg.index_copy(0, idx, feats[n:])
        else:
            out["text_features"] = self._encode_text(texts)
        if self.stc_head is not None:
            out["tag_logits"] = self.stc_head(image_features)
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out


def _trimmable(clip: nn.Module) -> bool:
    """open_clip `CLIP` with a causal text tower pooled at the end-of-text token (argmax / eos)."""
    return (all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
            and getattr(clip, "attn_mask", None) is not None
            and getattr(clip, "text_pool_type", None) in ("argmax", "eos"))


def _encode_cut(clip: nn.Module, tokens: Tensor) -> Tensor:
    """The text tower on `tokens` cut to their own length (the CLIP text path, positions [0, L))."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def encode_text(clip: nn.Module, tokens: Tensor) -> Tensor:
    """Unit-norm text features; equal to `clip.encode_text(tokens, normalize=True)` up to float rounding."""
    n = tokens.shape[0]
    if n < 4 or not _trimmable(clip):
        return clip.encode_text(tokens, normalize=True)
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    lengths = ((tokens != 0) * positions).amax(dim=1)  # one past the last non-pad token (end-of-text included)
    order = torch.argsort(lengths)
    ordered = lengths[order].tolist()
    # the split into (short, long) that runs the fewest token positions
    k = min(range(1, n), key=lambda i: i * ordered[i - 1] + (n - i) * ordered[-1])
    parts = [order[:k], order[k:]]
    feats = torch.cat([_encode_cut(clip, tokens[idx, :int(max(lengths[idx].max(), 1))]) for idx in parts])
    return feats[torch.argsort(torch.cat(parts))]


def _embed_dim(clip: nn.Module) -> int:
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, Tensor):
        return proj.shape[1]
    return int(clip.visual.output_dim)
