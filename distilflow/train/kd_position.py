"""The input-adaptive KD weight in the loop (``distill.adaptive``): per position, normalised over the step.

losses/adaptive.py has the math: a raw weight ``r`` per position (sample or token) from how sure
the teacher is there, and ``a = r * n / Z`` with ``Z`` and ``n`` summed over the *whole optimizer
step*, so that the mean of ``a`` over the step's real positions is exactly 1 and the KD term keeps
the scale of the KD-weight schedule. The loop (train/loop.py) calls :meth:`PositionWeights.weigh`
once per step that uses the KD term, before the first backward pass:

1. the teacher's signals of every micro-batch of the step are computed first and kept (the loop
   hands the same outputs to the objective afterwards, so the teacher runs once per micro-batch):
   one step's teacher outputs are held together, ``grad_accum`` micro-batches of them (hidden
   states for the fused loss, top-k ids for a cache, logits otherwise);
2. each micro-batch's scores, then ``(Z, n)`` of the step, summed over the ranks under torchrun
   (one all-reduce of two numbers), so every rank normalises by the global step;
3. ``a`` per micro-batch into ``Targets.kd_weight``, beside the boolean ``kd_mask``.

:meth:`PositionWeights.summary` gives ``min``, ``p10``, ``p50``, ``p90``, ``max`` and ``mean`` of
``a`` over the real positions of the last weighted step (all ranks' positions, gathered), logged as
``kd_position_weight_*`` in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from distilflow.losses.adaptive import AdaptiveKD, log_scores, position_weights, step_totals, summary
from distilflow.losses.confidence import signal_confidence
from distilflow.losses.objective import Outputs, Targets

if TYPE_CHECKING:
    from distilflow.train.dist import World

PREFIX = "kd_position_weight_"


class PositionWeights:
    """``distill.adaptive`` for one stage: ``settings`` (checked), ``vocab_size`` the ids the teacher's
    signals span (a top-k cache's confidence needs it), ``chunk_rows`` the rows per chunk in which
    dense signals are read (0: about 8M logits per chunk, as the chunked loss)."""

    def __init__(self, settings: AdaptiveKD, *, vocab_size: int | None, chunk_rows: int = 0) -> None:
        settings.check()
        self.settings, self.vocab_size, self.chunk_rows = settings, vocab_size, chunk_rows
        self.last: tuple[list[torch.Tensor], list[torch.Tensor | None]] | None = None

    def scores(self, output: Outputs, target: Targets, per_token: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``log r`` ``(B,)`` or ``(B, T)`` of one micro-batch and the mask of its real positions."""
        labels = target.labels if self.settings.source == "correctness" else None
        confidence = signal_confidence(
            output.logits,
            labels=labels,
            temperature=self.settings.confidence_temperature,
            vocab_size=self.vocab_size,
            chunk_rows=self.chunk_rows,
        )
        return log_scores(confidence, self.settings), target.kd_mask if per_token else None

    def weigh(
        self, outputs: Sequence[Outputs], targets: Sequence[Targets], *, per_token: bool, world: World
    ) -> list[Targets]:
        """``targets`` of the step's micro-batches with their ``kd_weight`` (the teacher ``outputs`` of
        the same micro-batches, in order). Under torchrun every rank calls it at the same step."""
        scored = [self.scores(o, t, per_token) for o, t in zip(outputs, targets, strict=True)]
        total, count = step_totals([s for s, _ in scored], [m for _, m in scored])
        summed = world.all_reduce_sums({"total": total, "count": float(count)})
        weights = [position_weights(s, m, total=summed["total"], count=int(summed["count"])) for s, m in scored]
        self.last = (weights, [m for _, m in scored])
        return [dataclasses.replace(t, kd_weight=w) for t, w in zip(targets, weights)]

    def summary(self, world: World) -> dict[str, float]:
        """The distribution of the last weighted step's weights (every rank's positions), keyed
        ``kd_position_weight_<stat>``; empty before the first weighted step. A collective under
        torchrun: every rank calls it at the same step."""
        if self.last is None:
            local = torch.zeros(0, dtype=torch.float64)
        else:
            weights, masks = self.last
            real = [w if m is None else w[m.bool()] for w, m in zip(weights, masks)]
            local = torch.cat([r.reshape(-1).double().cpu() for r in real])
        values = torch.cat(world.all_gather_objects(local)) if world.distributed else local
        return {f"{PREFIX}{k}": v for k, v in summary([values], [None]).items()}
