"""A CLIP's judgement of annotations, two ways.

`score` (CLIP_{g-1} at annotation time, stored in `annotations.score`): how much closer the image is to
`desc` than to `neg_desc`, the mean over aligned sentence pairs of cos(image, desc_i) - cos(image,
neg_desc_i). Positive means the previous CLIP agrees that the description fits better than its minimal edit
(the paper's Fig. 4 compares CLIP scores of descriptions and negatives the same way). Rows are scored
before they are written, so the score lands in the row's first and only write.

`fit` (the CLIP trained on those annotations, when the next generation picks its best ones): the mean
over `desc` sentences of cos(image, desc_i): how well the description fits the image. It picks true
annotations far better than the margin: on the demo's generation-1 annotations of images outside SFT (3
seeds), the best quarter by fit has fact-F1 0.700 against 0.531 by margin (all: 0.502; Spearman with
fact-F1 0.41 vs 0.13; benchmarks/results/best_annotations.md): 76% of margins are exactly 0, where the
negative repeats the description.
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
    def _images(self, images: Sequence[ImageLike], records: Sequence[Optional[dict]]):
        """(row positions with a record and a readable image, their unit image embeddings)."""
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
            return rows, None
        return rows, torch.nn.functional.normalize(
            self.model.encode_image(torch.stack(pixels).to(self.device)).float(), dim=-1
        )

    def _per_row_mean(self, n: int, rows: list, values: torch.Tensor, owner: list) -> list[Optional[float]]:
        """The mean of `values` per owning row (owner: the index into `rows` of each value)."""
        out: list[Optional[float]] = [None] * n
        owner_t = torch.tensor(owner, device=self.device, dtype=torch.long)
        sums = torch.zeros(len(rows), device=self.device).index_add_(0, owner_t, values)
        counts = torch.zeros(len(rows), device=self.device).index_add_(0, owner_t, torch.ones_like(values))
        for k, i in enumerate(rows):
            if counts[k] > 0:
                out[i] = float(sums[k] / counts[k])
        return out

    @torch.inference_mode()
    def score(self, images: Sequence[ImageLike], records: Sequence[Optional[dict]]) -> list[Optional[float]]:
        """Margin per row; None where the row has no record or its image cannot be read."""
        rows, img = self._images(images, records)
        if not rows:
            return [None] * len(records)
        pos, neg, owner = [], [], []
        for k, i in enumerate(rows):
            for p, n in zip(records[i]["desc"], records[i]["neg_desc"]):
                pos.append(p), neg.append(n), owner.append(k)
        if not pos:
            return [None] * len(records)
        emb = self._texts(pos + neg)
        margin = ((emb[: len(pos)] - emb[len(pos) :]) * img[torch.tensor(owner, device=self.device)]).sum(-1)
        return self._per_row_mean(len(records), rows, margin, owner)

    @torch.inference_mode()
    def fit(self, images: Sequence[ImageLike], records: Sequence[Optional[dict]]) -> list[Optional[float]]:
        """Mean cos(image, desc sentence) per row; None without a record, a readable image or a sentence."""
        rows, img = self._images(images, records)
        if not rows:
            return [None] * len(records)
        texts, owner = [], []
        for k, i in enumerate(rows):
            for sentence in records[i]["desc"]:
                texts.append(sentence), owner.append(k)
        if not texts:
            return [None] * len(records)
        cos = (self._texts(texts) * img[torch.tensor(owner, device=self.device)]).sum(-1)
        return self._per_row_mean(len(records), rows, cos, owner)
