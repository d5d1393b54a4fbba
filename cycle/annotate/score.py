"""CLIP_{g-1}'s judgement of an annotation: how much closer the image is to `desc` than to `neg_desc`.

score = mean over aligned sentence pairs of cos(image, desc_i) - cos(image, neg_desc_i). Positive means
the previous CLIP agrees that the description fits better than its minimal edit (the paper's Fig. 4
compares CLIP scores of descriptions and negatives the same way). Rows are scored before they are
written, so the score lands in the row's first and only write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..device import resolve_device
from .backends.base import ImageLike, to_pil

TEXT_BATCH = 256  # sentences per text-encoder call: bounded memory whatever the annotation batch


class ClipScorer:
    def __init__(self, clip_dir: str | Path, device: str = "cpu", text_batch: int = TEXT_BATCH):
        from ..clip.saved import load_clip

        self.device = resolve_device(device)
        self.model, self.preprocess, self.tokenizer, _ = load_clip(clip_dir, device=self.device)
        self.text_batch = text_batch
        self.clip_dir = str(clip_dir)

    @torch.inference_mode()
    def _texts(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), self.text_batch):
            tokens = self.tokenizer(texts[i : i + self.text_batch]).to(self.device)
            chunks.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(chunks)

    @torch.inference_mode()
    def score(self, images: Sequence[ImageLike], records: Sequence[Optional[dict]]) -> list[Optional[float]]:
        """Margin per row; None where the row has no record or its image cannot be read."""
        out: list[Optional[float]] = [None] * len(records)
        rows, pixels = [], []
        for i, (image, rec) in enumerate(zip(images, records)):
            if rec is None:
                continue
            try:
                pixels.append(self.preprocess(to_pil(image)))
            except ValueError:
                continue
            rows.append(i)
        if not rows:
            return out
        img = torch.nn.functional.normalize(
            self.model.encode_image(torch.stack(pixels).to(self.device)).float(), dim=-1
        )
        pos, neg, owner = [], [], []
        for k, i in enumerate(rows):
            for p, n in zip(records[i]["desc"], records[i]["neg_desc"]):
                pos.append(p), neg.append(n), owner.append(k)
        emb = self._texts(pos + neg)
        owner_t = torch.tensor(owner, device=self.device)
        margin = ((emb[: len(pos)] - emb[len(pos) :]) * img[owner_t]).sum(-1)
        sums = torch.zeros(len(rows), device=self.device).index_add_(0, owner_t, margin)
        counts = torch.zeros(len(rows), device=self.device).index_add_(0, owner_t, torch.ones_like(margin))
        for k, i in enumerate(rows):
            out[i] = float(sums[k] / counts[k])
        return out
