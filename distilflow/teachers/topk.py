"""The mixture of top-k teachers as one top-k teacher over the union of their ids.

Used by teachers/combine.py when every teacher is a top-k cache: nothing of vocabulary size is
made, only ``(..., sum_i K_i)`` tensors. See :func:`combine_topk` for what is exact and what is
approximated (a teacher's share of an id it did not cache: its tail spread uniformly, as in
losses/confidence.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from distilflow.losses.confidence import tail_log_share, topk_confidence
from distilflow.losses.sparse import SparseTeacher
from distilflow.teachers.weighting import Combination, route_per_position, teacher_weights


def combine_topk(
    signals: Sequence[SparseTeacher],
    *,
    temperature: float,
    combination: Combination,
    vocab_size: int,
    labels: torch.Tensor | None = None,
    route: torch.Tensor | None = None,
) -> SparseTeacher:
    """The mixture of top-k teachers as one top-k teacher over the union of their ids, per position.

    For each id ``u`` of the union: ``p(u) = sum_i w_i p_i(u)``, where ``p_i(u)`` is teacher i's
    cached value if it cached ``u`` and else its tail spread uniformly, ``tail_i / (V - K_i)``; the
    combined tail (what the union leaves) follows, so the result sums to 1. Exact: the total mass,
    and every id cached by all teachers with non-zero weight; approximated: a teacher's share of an
    id it did not cache. With K = V for every teacher it equals the dense mixture exactly. Teachers
    with weight 0 at a position (routing) add no ids there. Shapes: ``ids`` / ``values`` ``(..., K_i)``;
    the result ``(..., K_union)`` with ``K_union <= sum_i K_i`` (padding slots ``-inf``).
    """
    positions = signals[0].shape
    route = route_per_position(route, positions)
    confidences = None
    if combination.adaptive:
        confidences = [
            topk_confidence(s, vocab_size=vocab_size, labels=labels, temperature=combination.confidence_temperature)
            for s in signals
        ]
    dtype = torch.float64 if any(s.values.dtype == torch.float64 for s in signals) else torch.float32
    device = signals[0].values.device
    weights = teacher_weights(
        combination,
        teachers=len(signals),
        positions=positions,
        confidences=confidences,
        route=route,
        dtype=dtype,
        device=device,
    )  # (..., N)
    with torch.no_grad():
        return _union(signals, weights, vocab_size, temperature, dtype)


def _union(
    signals: Sequence[SparseTeacher], weights: torch.Tensor, vocab_size: int, temperature: float, dtype
) -> SparseTeacher:
    """The union of ids and their mixed probabilities (see :func:`combine_topk`)."""
    shares = torch.stack([tail_log_share(s, vocab_size)[0] for s in signals], -1).to(dtype).exp()  # (..., N)
    base = (weights * shares).sum(-1, keepdim=True)  # (..., 1): every id's mass from teachers that lack it
    ids = torch.cat([s.ids.long() for s in signals], -1)  # (..., S), S = sum K_i
    values = torch.cat([s.values.to(dtype) for s in signals], -1)
    owner = torch.cat([torch.full((s.ids.shape[-1],), i, device=ids.device) for i, s in enumerate(signals)])
    slot_weight = weights.index_select(-1, owner)  # (..., S)
    valid = ~torch.isneginf(values) & (slot_weight > 0)
    zero = torch.zeros_like(values)
    mass = torch.where(valid, slot_weight * values.exp(), zero)  # what the caching teachers give
    lacked = torch.where(valid, slot_weight * shares.index_select(-1, owner), zero)  # ... and their tail share
    # Group equal ids: sort (invalid slots sort last under the sentinel id V), mark each run's first
    # slot, and sum each run into the run's index.
    key, order = torch.where(valid, ids, vocab_size).sort(-1)
    real = key < vocab_size
    first = real.clone()
    first[..., 1:] &= key[..., 1:] != key[..., :-1]
    run = (first.cumsum(-1) - 1).clamp(min=0)  # (..., S)
    slots = ids.shape[-1]
    run_mass = zero.scatter_add(-1, run, torch.where(real, mass.gather(-1, order), zero))
    run_lacked = zero.scatter_add(-1, run, torch.where(real, lacked.gather(-1, order), zero))
    union_ids = torch.zeros((*ids.shape[:-1], slots + 1), dtype=ids.dtype, device=ids.device)
    union_ids.scatter_(-1, torch.where(first, run, slots), key)  # non-first slots write to a dropped column
    count = first.sum(-1, keepdim=True)  # (..., 1) distinct ids per position
    used = torch.arange(slots, device=ids.device) < count
    # Teachers that did not cache u give it their share: base minus the share of those that did.
    prob = run_mass + (base - run_lacked).clamp(min=0.0)
    union_values = torch.where(used, torch.log(prob), torch.full_like(prob, -math.inf))
    width = max(int(count.max()) if count.numel() else 0, 1)
    return SparseTeacher(union_ids[..., :width], union_values[..., :width].contiguous(), "topk", temperature)
