"""A seeded, rank-aware batch sampler that can start mid-epoch, for exact resume."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches of dataset indices for one epoch.

    The epoch's order is a permutation drawn from ``seed + epoch`` (the same on every rank), padded
    to a multiple of ``world_size`` like ``DistributedSampler`` and split round-robin across ranks.
    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch`` batches so a resumed run sees
    exactly the batches the interrupted run had not yet seen.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if num_samples <= 0:
            raise ValueError("the dataset is empty: no images to train on")
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def _rank_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = math.ceil(self.num_samples / self.world_size)
        total = per_rank * self.world_size
        order = order + order[: total - len(order)]  # pad by repeating, as DistributedSampler
        return order[self.rank:total:self.world_size]

    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.num_samples / self.world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        idx = self._rank_indices()
        for b in range(self.start_batch, self.batches_per_epoch()):
            batch = idx[b * self.batch_size:(b + 1) * self.batch_size]
            if batch:
                yield batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)
