"""Training-time image augmentation drawn per (seed, step, sample id), applied to the collated batch.

open_clip's training transform (a RandomResizedCrop, scale 0.9-1.0) draws from the process's global RNG
inside loader workers: a resumed run, or a run split over another number of ranks, would then see other
crops. Here the dataset yields the deterministic (validation) transform's tensors and the crop is drawn
from a generator keyed by the sample, so resume and rank count never change what a step sees.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# open_clip's training crop (`RandomResizedCrop` with these ranges): area share and aspect ratio of the box.
CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# torchvision's rule: this many random boxes are tried before falling back to the whole image.
CROP_TRIES = 10
# A fixed last word of the generator's seed: these draws never share a stream with the text draws
# (`text.TextDrawer`), which are keyed by (seed, step, sample id) too.
CROP_STREAM = 0xA06


def _crop_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box rule (`CROP_TRIES` tries, then the whole image), from an explicit generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, height, width


def random_resized_crop(
    images: torch.Tensor,
    ids: Sequence[str],
    seed: int,
    step: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
    """Crop each image of an (N, C, H, W) batch and resize it back to (H, W), seeded by (seed, step, id)."""
    if scale[0] >= 1.0:
        return images
    n, _, height, width = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        key = int.from_bytes(hashlib.blake2b(str(ids[i]).encode(), digest_size=8).digest(), "little")
        rng = np.random.default_rng([int(seed), int(step), key, CROP_STREAM])
        top, left, h, w = _crop_box(rng, height, width, scale, ratio)
        out[i] = TF.resized_crop(
            images[i], top, left, h, w, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True
        )
    return out
