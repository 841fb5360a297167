"""Teacher distributions known at a few vocabulary ids per position (cached top-k or sampled ids).

A full teacher distribution over a 150k vocabulary costs 300 kB per token in fp16; a cache keeps
only a few ids per position. Two kinds:

- ``topk``: the k most likely ids and the teacher's log-probabilities there, at the distillation
  temperature ``T`` the cache was written with; the rest of the mass (the tail) is
  ``1 - sum(exp(values))``.
- ``sampled``: ids drawn from the teacher's distribution at temperature ``T`` (Anshumann et al.
  2025, "Sparse Logit Sampling"), ``values`` the importance weight of each drawn id (summing to 1
  per position; repeated draws of one id are merged). An unbiased estimate of the full target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class SparseTeacher:
    """``ids`` ``(..., K)`` int64 vocabulary ids; ``values`` ``(..., K)`` float32 (see module docstring).

    Padding slots (a position with fewer than K distinct ids) have ``values`` of ``-inf`` (topk) or
    ``0`` (sampled) and any valid id.
    """

    ids: torch.Tensor
    values: torch.Tensor
    kind: Literal["topk", "sampled"]
    temperature: float

    @property
    def shape(self) -> torch.Size:
        """Shape of the positions, without the K axis (what a dense ``(..., V)`` logits tensor has before V)."""
        return self.ids.shape[:-1]
