"""Small statistics the benchmark scripts share (imported from the scripts' own folder)."""

from __future__ import annotations

import statistics


def sample_std(values: list[float]) -> float:
    """The sample standard deviation over seeds, 0.0 for a single value (statistics.stdev needs two)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0
