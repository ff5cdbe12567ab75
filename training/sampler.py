"""A deterministic, rank-sharded sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Indices of one rank's share of the data, reshuffled each epoch from ``seed + epoch``.

    Every rank gets the same number of indices (the tail that does not divide evenly is dropped),
    so ranks step together. After `resume_from(epoch, consumed)` the next pass over `epoch` skips
    the first `consumed` items of the epoch's order, whichever ranks trained on them, and shards the
    rest: a run resumed on another number of ranks repeats nothing. `len()` stays the full epoch
    length so that Lightning's batch counter, which resumes from the checkpoint, ends the epoch at the
    same place when the number of ranks is unchanged.
    """

    def __init__(
        self, num_items: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_items = num_items
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches to skip)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Skip the first `consumed` items of the epoch's order (all ranks together) the next time
        `epoch` is iterated."""
        self._skip = (epoch, consumed)

    def __len__(self) -> int:
        return self.num_items // self.world_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        order = order[: len(self) * self.world_size]  # the tail that does not divide evenly is dropped
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order[self.rank : len(order) - len(order) % self.world_size : self.world_size].tolist())
