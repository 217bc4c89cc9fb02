"""Seeded train/validation splits, and the sampler that gives each training epoch its own
order from (seed, epoch) alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def resolve_split_size(size: int | float, total: int, name: str) -> int:
    """Turn a count (int) or a fraction in [0, 1) (float) into a number of samples."""
    if isinstance(size, bool):
        raise ValueError(f"{name} must be a count or a fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"{name} as a fraction must lie in [0, 1), got {size}")
        count = int(round(size * total))
    else:
        count = int(size)
    if not 0 <= count < total:
        raise ValueError(f"{name}={size!r} leaves no training samples out of {total}")
    return count


def seeded_split(total: int, sizes: Sequence[int | float], seed: int) -> list[torch.Tensor]:
    """Split range(total) at random (seeded) into [rest, part_1, part_2, ...].

    `sizes` gives the size of each part after the first (counts or fractions of
    `total`). Each returned index tensor is sorted, so the order of samples in a
    split follows the order of the source files.
    """
    counts = [resolve_split_size(size, total, "split size") for size in sizes]
    if sum(counts) >= total:
        raise ValueError(f"split sizes {list(sizes)} leave no training samples out of {total}")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(total, generator=generator)
    parts = []
    start = total - sum(counts)
    parts.append(permutation[:start].sort().values)
    for count in counts:
        parts.append(permutation[start : start + count].sort().values)
        start += count
    return parts


class EpochSeededSampler(DistributedSampler):
    """A fresh random order of the samples each epoch, drawn from (seed, epoch) alone, and this
    process's share of it.

    Without `weights` each epoch's order is a permutation of range(size); with
    `weights` (one per sample) `size` indices are drawn with replacement in
    proportion to them. Lightning calls `set_epoch` before every training epoch,
    also after resuming from a checkpoint, so epoch k sees the same order whether
    or not the run was interrupted (a generator carried across epochs would
    restart at epoch 0's order). Without `set_epoch` calls (a plain loop over the
    DataLoader) each pass moves on to the next epoch.

    With `num_replicas` processes, process `rank` takes every num_replicas-th
    sample of the order (padded by repeating its start, as DistributedSampler
    does), so the processes' batches together are the batches of one process
    with num_replicas times the batch size. Being a DistributedSampler, Lightning
    keeps it instead of wrapping it in its own, which would shuffle again.
    """

    def __init__(
        self, size: int, seed: int, weights: torch.Tensor | None = None, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        if weights is not None and weights.shape != (size,):
            raise ValueError(f"weights must have shape ({size},), got {tuple(weights.shape)}")
        self.size = size
        self.weights = weights

    def __iter__(self):
        # SeedSequence mixes (seed, epoch) so that no two pairs share a stream (seed + epoch would).
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        order += order[: self.total_size - len(order)]
        self.epoch += 1
        return iter(order[self.rank : self.total_size : self.num_replicas])

