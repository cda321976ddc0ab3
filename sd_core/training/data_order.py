"""The trainer's view of the latent cache: the held-out split and the deterministic micro-batch order.

- :func:`split_indices`: a sample is held out for validation when a hash of (shard name, row) falls below the
  validation share: deterministic, seed-independent and stable as shards are added.
- :class:`MicroBatches`: epoch ``e`` is ``DistributedSampler(train_indices, seed).set_epoch(e)`` cut into
  micro-batches; the position in the stream is a function of the optimiser step alone, so a resumed run
  continues exactly where the checkpoint left off.
- :class:`BatchReader`: DataLoader items are whole micro-batches, read with one gather per shard.
"""

from __future__ import annotations

import zlib
from typing import Any, Iterator, Sequence

import numpy as np


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_indices(dataset: Any, val_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) into ``dataset``: a sample is held out when the hash of its
    (shard name, row) falls below ``val_share``. Deterministic, seed-independent and stable as shards are added
    (a shard's samples keep their assignment whatever other shards exist)."""
    is_val = np.zeros(len(dataset), dtype=bool)
    if val_share > 0:
        threshold = np.uint64(min(int(val_share * 2.0**64), 2**64 - 1))
        for j, shard in enumerate(dataset.shards):
            lo, hi = int(dataset.offsets[j]), int(dataset.offsets[j + 1])
            salt = np.uint64(zlib.crc32(shard.encode()) << 20)
            rows = np.arange(hi - lo, dtype=np.uint64)
            is_val[lo:hi] = _splitmix64(rows ^ salt) < threshold
    all_idx = np.arange(len(dataset), dtype=np.int64)
    return all_idx[~is_val], all_idx[is_val]


class BatchReader:
    """Map-style view of a LatentDataset whose items are whole micro-batches (a list of indices in, tensors
    out), so DataLoader workers read a batch with one gather per shard."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getitem__(self, indices: Sequence[int]):
        import torch

        lat, tok = self.dataset.get_batch(np.asarray(indices, dtype=np.int64))
        return torch.from_numpy(lat), torch.from_numpy(tok)

    def __len__(self) -> int:
        return len(self.dataset)


class MicroBatches:
    """The micro-batch order of this rank: epoch e is ``DistributedSampler(train_indices, seed, drop_last)``
    at ``set_epoch(e)``, cut into micro-batches; only whole optimiser steps per epoch are used, so an epoch is
    ``steps_per_epoch × grad_accum`` micro-batches and the position is a function of the step alone."""

    def __init__(self, train_indices: np.ndarray, *, batch_size: int, grad_accum: int, world_size: int,
                 rank: int, seed: int) -> None:
        from torch.utils.data import DistributedSampler

        self.train_indices = train_indices
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.sampler = DistributedSampler(range(len(train_indices)), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_rank = len(self.sampler)
        self.steps_per_epoch = self.per_rank // (batch_size * grad_accum)
        self.micro_per_epoch = self.steps_per_epoch * grad_accum

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, micro-batch within the epoch) at which optimiser step ``step`` (0-based) starts."""
        consumed = step * self.grad_accum
        return consumed // self.micro_per_epoch, consumed % self.micro_per_epoch

    def iter_from(self, step: int) -> Iterator[list[int]]:
        epoch, skip = self.position(step)
        while True:
            self.sampler.set_epoch(epoch)
            order = np.fromiter(iter(self.sampler), dtype=np.int64, count=self.per_rank)
            for m in range(skip, self.micro_per_epoch):
                sel = order[m * self.batch_size:(m + 1) * self.batch_size]
                yield self.train_indices[sel].tolist()
            epoch, skip = epoch + 1, 0
