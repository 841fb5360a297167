"""Batch order: a pure function of (seed, step) that walks epoch by epoch."""

from __future__ import annotations

import torch

from distilflow.data import batches
from distilflow.data.batches import batch_indices


def _stream(steps: int, *, num_samples: int, batch_size: int, seed: int) -> torch.Tensor:
    return torch.cat(
        [batch_indices(s, num_samples=num_samples, batch_size=batch_size, seed=seed) for s in range(steps)]
    )


def test_pure_function_of_seed_and_step():
    kwargs = {"num_samples": 23, "batch_size": 5, "seed": 7}
    forward = [batch_indices(s, **kwargs) for s in range(12)]
    # Another order of calls, a cold cache and other seeds in between change nothing.
    batches.epoch_permutation.cache_clear()
    for s in reversed(range(12)):
        batch_indices(s, num_samples=23, batch_size=5, seed=8)
        assert torch.equal(batch_indices(s, **kwargs), forward[s])
    assert all(b.dtype == torch.long and b.shape == (5,) for b in forward)


def test_every_epoch_visits_every_sample_once():
    n = 12
    stream = _stream(9, num_samples=n, batch_size=4, seed=0)  # exactly three epochs
    epochs = stream.view(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    # Each epoch is reshuffled: not the same order again, and not the identity.
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert not torch.equal(epochs[0], torch.arange(n))


def test_batches_across_an_epoch_boundary():
    n = 10
    stream = _stream(5, num_samples=n, batch_size=4, seed=3)  # 20 indices, two epochs
    assert sorted(stream[:n].tolist()) == list(range(n))
    assert sorted(stream[n:].tolist()) == list(range(n))
    # Step 2 holds samples 8..11 of the stream: the last two of epoch 0, the first two of epoch 1.
    crossing = batch_indices(2, num_samples=n, batch_size=4, seed=3)
    assert torch.equal(crossing, stream[8:12])
    # The stream does not depend on the batch size; a batch larger than the data spans epochs.
    assert torch.equal(_stream(4, num_samples=n, batch_size=5, seed=3), stream)
    big = batch_indices(0, num_samples=n, batch_size=25, seed=3)
    assert big.shape == (25,)
    assert torch.equal(big[:20], stream)
    assert sorted(big[:10].tolist()) == sorted(big[10:20].tolist()) == list(range(n))


def test_different_seeds_differ():
    a = batch_indices(0, num_samples=100, batch_size=16, seed=0)
    b = batch_indices(0, num_samples=100, batch_size=16, seed=1)
    assert not torch.equal(a, b)
    # Seeds and epochs do not alias: seed 0's second epoch is not seed 1's first.
    epoch1_seed0 = _stream(2, num_samples=8, batch_size=8, seed=0)[8:]
    epoch0_seed1 = batch_indices(0, num_samples=8, batch_size=8, seed=1)
    assert not torch.equal(epoch1_seed0, epoch0_seed1)
