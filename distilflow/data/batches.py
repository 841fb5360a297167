"""Batch order as a pure function of (seed, step): a resumed run sees the same batches."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=4)
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``num_samples`` rows in ``epoch`` (cached: consecutive steps read one epoch)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, *, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    """Indices of the samples in optimizer step ``step``.

    Samples are visited epoch by epoch in a permutation seeded by ``(seed, epoch)``; a batch that
    crosses an epoch boundary takes the rest from the next epoch's permutation.
    """
    start = step * batch_size
    pieces = []
    taken = 0
    while taken < batch_size:
        epoch, offset = divmod(start + taken, num_samples)
        piece = epoch_permutation(num_samples, seed, epoch)[offset : offset + batch_size - taken]
        pieces.append(piece)
        taken += len(piece)
    return torch.cat(pieces)
