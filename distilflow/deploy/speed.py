"""The machine's own speed, timed beside size-student's latency measurements.

A VM on a shared host can run at about half speed for minutes at a time. On this project's machines a whole
sweep ran 1.5-2x slower than one taken minutes before, with nothing else running and the guest's steal
counter silent (docs/BENCHMARKS.md, "LM demo, session 6"). A latency measured in such a window says
nothing about the shape. :func:`probe_ms` times a fixed reference workload: float32 matrix products in
torch at the thread count set, then an interpreter loop, the same work every call. size-student samples
it once per timing round, so every measurement carries the machine's speed at the time. A re-timing that
misses the budget while the probe runs :data:`SLOW` times slower than in the sweep is blamed on the
machine, not on the shape (size_student.confirm_choice).
"""

from __future__ import annotations

import statistics
import time

import torch

SLOW = 1.3
"""A re-timing whose probe median is this many times the sweep's ran in a slow window."""

REFERENCE_MATRIX = torch.linspace(-1.0, 1.0, 128 * 128).reshape(128, 128)


def probe_ms() -> float:
    """Milliseconds for the reference workload: 20 products of a 128 x 128 float32 matrix, then a
    20,000-step Python loop (about 2-3 ms on the machines measured)."""
    began = time.perf_counter()
    for _ in range(20):
        torch.mm(REFERENCE_MATRIX, REFERENCE_MATRIX)
    total = 0
    for i in range(20_000):
        total += i
    return (time.perf_counter() - began) * 1000


def median(samples: list[float]) -> float:
    """The probe's figure for one measurement: the median of its per-round samples (NaN without any)."""
    return statistics.median(samples) if samples else float("nan")
