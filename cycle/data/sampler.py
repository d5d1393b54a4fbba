"""A batch sampler whose order is a pure function of (seed, epoch, shards) and that resumes at the exact sample.

The samples are cut into `shards` contiguous ranges of equal size (the last `num_samples % shards` left
out); global batch b of an epoch is, for each shard in turn, the b-th slice of that shard's own
permutation. Each rank owns `shards / world_size` whole shards and takes exactly their slices of every
global batch, so a rank reads only its own rows, and the rank slices concatenated in rank order (what an
all-gather does) give back the global batch. The global batches depend on the shard count, not on the
world size: one process with `shards=2` sees the batches two ranks see together. Training uses
`shards = world_size`; with one shard the order is one permutation of all samples.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[list[int]]):
    """Yields this rank's list of indices for each global batch of the current epoch.

    Args:
        num_samples: the samples of all shards together.
        seed: with the epoch (and the shard), fixes the permutation (`numpy` PCG64 seeded with
            [seed, epoch], or [seed, epoch, shard] when there are several shards).
        drop_last: drop the last global batch when it is short (required with several ranks or shards,
            since a contrastive all-gather needs equal shares).
        batch_size: the *global* batch; must divide by world_size and by shards.
        rank, world_size: this process's share (see the module docstring).
        shuffle: False gives the sequential order (evaluation).
        shards: how many contiguous ranges the samples are cut into (default: world_size); a multiple of
            world_size.

    Indices are *local* to the rank: 0 is the first row of its first shard (`owned_rows` says which
    rows of the whole those are), so the rank's dataset holds only its rows.

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
        shards: Optional[int] = None,
    ):
        shards = world_size if shards is None else shards
        if num_samples < 0 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}: expected >= 0 and >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"global batch_size {batch_size} does not divide by world_size {world_size}")
        if shards < 1 or shards % world_size or batch_size % shards:
            raise ValueError(
                f"shards={shards}: expected a multiple of world_size {world_size} that divides batch_size {batch_size}"
            )
        if shards > 1 and not drop_last:
            raise ValueError("several ranks or shards need drop_last=True: every rank must get an equal share")
        self.num_samples, self.seed, self.drop_last, self.batch_size = num_samples, seed, drop_last, batch_size
        self.rank, self.world_size, self.shuffle, self.shards = rank, world_size, shuffle, shards
        self.local_batch_size = batch_size // world_size
        self.shard_size = num_samples // shards
        per_rank = shards // world_size
        self.owned_shards = range(rank * per_rank, (rank + 1) * per_rank)
        self.epoch = 0
        self.position = 0
        self.iter_origin = (0, 0)

    # -- order ---------------------------------------------------------------------------------------
    @property
    def owned_rows(self) -> tuple[int, int]:
        """[start, stop) of the rows (of all `num_samples`) this rank reads; its index 0 is `start`."""
        if self.shards == 1:
            return 0, self.num_samples
        return self.owned_shards.start * self.shard_size, self.owned_shards.stop * self.shard_size

    @property
    def epoch_length(self) -> int:
        """Samples an epoch yields (the short tail dropped with drop_last)."""
        if self.shards > 1:
            per_shard = self.batch_size // self.shards
            return self.shards * (self.shard_size - self.shard_size % per_shard)
        if self.drop_last:
            return self.num_samples - self.num_samples % self.batch_size
        return self.num_samples

    def _shard_order(self, epoch: int, shard: int) -> np.ndarray:
        """The permutation of one shard's rows (indices within the shard)."""
        if not self.shuffle:
            return np.arange(self.shard_size, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, shard]).permutation(self.shard_size).astype(np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The global order of `epoch` (indices of all `num_samples`): the same for every rank, process and run."""
        if self.shards == 1:
            if not self.shuffle:
                return np.arange(self.num_samples, dtype=np.int64)
            return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples).astype(np.int64)
        per_shard = self.batch_size // self.shards
        steps = self.epoch_length // self.batch_size
        parts = [s * self.shard_size + self._shard_order(epoch, s)[: steps * per_shard] for s in range(self.shards)]
        return np.stack([p.reshape(steps, per_shard) for p in parts], axis=1).reshape(-1)

    def __len__(self) -> int:
        """Batches in a whole epoch (not what is left of the current one)."""
        return -(-self.epoch_length // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        # Not a generator itself: the rollover happens at iter() time, which the loader relies on.
        if self.position >= self.epoch_length and self.epoch_length > 0:
            self.epoch, self.position = self.epoch + 1, 0
        self.iter_origin = (self.epoch, self.position)  # where this pass began, for the loader's count
        if self.shards > 1:
            return self._shard_batches(self.epoch, self.position)
        return self._batches(self.order(self.epoch), self.position)

    def _batches(self, order: np.ndarray, start: int) -> Iterator[list[int]]:
        for begin in range(start, self.epoch_length, self.batch_size):
            self.position = min(begin + self.batch_size, self.epoch_length)  # before yield: taken = counted
            yield order[begin : self.position].tolist()

    def _shard_batches(self, epoch: int, start: int) -> Iterator[list[int]]:
        """This rank's slices of each global batch from `start` on: only its own shards' permutations."""
        per_shard = self.batch_size // self.shards
        first = self.owned_shards.start
        orders = [(s - first) * self.shard_size + self._shard_order(epoch, s) for s in self.owned_shards]
        for k in range(start // self.batch_size, self.epoch_length // self.batch_size):
            self.position = (k + 1) * self.batch_size  # before yield: taken = counted
            yield np.concatenate([o[k * per_shard : (k + 1) * per_shard] for o in orders]).tolist()

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
