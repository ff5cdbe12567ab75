"""A deterministic, rank-sharded sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Indices of one rank's share of the data, reshuffled each epoch from ``seed + epoch``.

    A `DistributedSampler`, so Lightning (`use_distributed_sampler`, on by default) keeps it as it is
    rather than wrapping it in one that would shard this rank's share again.

    Every rank gets the same number of indices (the tail that does not divide evenly is dropped),
    so ranks step together. After `resume_from(epoch, consumed, counted)` the next pass over `epoch`
    skips the first `consumed` items of the epoch's order, whichever ranks trained on them, and shards
    the rest: a run resumed on another number of ranks or batch size repeats nothing. Lightning ends an
    epoch after `len(loader)` batches counted from its checkpointed batch counter, so until that pass
    `len()` covers the `counted` items that counter stands for plus this rank's share of the rest (at
    least a full epoch's share): the resumed epoch runs to the end of its data.
    """

    def __init__(
        self, num_items: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.num_items = num_items
        self._skip: tuple[int, int, int] | None = None  # (epoch, items to skip, items Lightning counts as done)

    def resume_from(self, epoch: int, consumed: int, counted: int = 0) -> None:
        """Skip the first `consumed` items of the epoch's order (all ranks together) the next time
        `epoch` is iterated; `counted`: the items of that epoch the loop counts as done on this rank
        (its restored batch counter times the batch size)."""
        self._skip = (epoch, consumed, counted)

    def __len__(self) -> int:
        share = self.num_items // self.num_replicas
        if self._skip is None:
            return share
        _, consumed, counted = self._skip
        return max(share, counted + max(0, share * self.num_replicas - consumed) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        # the tail that does not divide evenly is dropped
        order = order[: self.num_items // self.num_replicas * self.num_replicas]
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
            self._skip = None
        return iter(order[self.rank : len(order) - len(order) % self.num_replicas : self.num_replicas].tolist())
