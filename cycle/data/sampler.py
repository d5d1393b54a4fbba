"""A batch sampler whose order is a pure function of (seed, epoch) and that resumes at the exact sample.

Global batch b of an epoch is the same set of samples, in the same order, whatever the world size:
each rank takes a *contiguous* slice of it (rank r gets items [r * B/W, (r+1) * B/W)), so concatenating
the ranks' features in rank order (what an all-gather does) gives back the single-process batch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[list[int]]):
    """Yields this rank's list of indices for each global batch of the current epoch.

    Args:
        num_samples: the dataset's length.
        seed: with the epoch, fixes the permutation (`numpy` PCG64 seeded with [seed, epoch]).
        drop_last: drop the last global batch when it is short (required with world_size > 1, since a
            contrastive all-gather needs equal shards).
        batch_size: the *global* batch; must divide by world_size.
        rank, world_size: this process's share (see the module docstring).
        shuffle: False gives the sequential order (evaluation).

    State: `epoch` and `position` (global samples of this epoch already taken). `set_epoch(e)` moves to
    epoch e from its start, unless e is already the current epoch (so resume, then the usual
    `set_epoch` at the top of the epoch loop, keeps the position). Iterating past the end of an epoch
    rolls over to the next one, so a state saved right after the last batch resumes at the next epoch.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        drop_last: bool = True,
        batch_size: int = 1,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if num_samples < 0 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}: expected >= 0 and >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} does not divide by world_size {world_size}")
        if world_size > 1 and not drop_last:
            raise ValueError("world_size > 1 needs drop_last=True: every rank must get an equal share")
        self.num_samples, self.seed, self.drop_last, self.batch_size = num_samples, seed, drop_last, batch_size
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        self.position = 0
        self.iter_origin = (0, 0)

    # -- order ---------------------------------------------------------------------------------------
    @property
    def epoch_length(self) -> int:
        """Samples an epoch yields (the short tail dropped with drop_last)."""
        if self.drop_last:
            return self.num_samples - self.num_samples % self.batch_size
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """The global order of `epoch`: the same for every rank, process and run."""
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).astype(np.int64)

    def __len__(self) -> int:
        """Batches in a whole epoch (not what is left of the current one)."""
        return -(-self.epoch_length // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator itself: the rollover happens at iter() time, which the loader relies on.
        if self.position >= self.epoch_length and self.epoch_length > 0:
            self.epoch, self.position = self.epoch + 1, 0
        self.iter_origin = (self.epoch, self.position)  # where this pass began, for the loader's count
        return self._batches(self.order(self.epoch), self.position)

    def _batches(self, order: np.ndarray, start: int) -> Iterator[list[int]]:
        share = self.local_batch_size
        for begin in range(start, self.epoch_length, self.batch_size):
            batch = order[begin : min(begin + self.batch_size, self.epoch_length)]
            if self.world_size > 1:
                batch = batch[self.rank * share : (self.rank + 1) * share]
            self.position = min(begin + self.batch_size, self.epoch_length)  # before yield: taken = counted
            yield batch.tolist()

    # -- state ---------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def mark_consumed(self, epoch: int, start: int, batches: int) -> None:
        """Set the position to `batches` global batches after `start` of `epoch` (used by the loader)."""
        self.epoch = epoch
        self.position = min(start + batches * self.batch_size, self.epoch_length)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.num_samples or epoch < 0:
            raise ValueError(f"sampler state {state}: position must be in [0, {self.num_samples}], epoch >= 0")
        self.epoch, self.position = epoch, position
