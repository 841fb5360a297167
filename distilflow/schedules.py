"""Schedules as pure functions of the step: KD weight, phase plan, learning rate.

Nothing here holds state, so a resumed run recomputes exactly the values it would have had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from distilflow.errors import UserError

if TYPE_CHECKING:
    from distilflow.config import KDWeightConfig, PhaseConfig


def article_kd_weight(step: int, *, base_weight: float, decay_rate: float, warmup_steps: int) -> float:
    """The article's ``DynamicWeightScheduler.get_weight``, kept as it is.

    ``base * step / warmup`` while ``step < warmup_steps``, then
    ``base * decay_rate ** (step - warmup_steps)``.
    """
    if step < warmup_steps:
        return base_weight * step / warmup_steps
    return base_weight * decay_rate ** (step - warmup_steps)


def kd_weight(step: int, total_steps: int, cfg: KDWeightConfig) -> float:
    """KD-loss weight at ``step`` (0-based) of a ``total_steps`` run.

    - ``constant``: ``base_weight`` (after the warm-up ramp, if any);
    - ``article``: :func:`article_kd_weight`, floored at ``min_weight``;
    - ``cosine``: ramp, then ``min + (base - min) * (1 + cos(pi * p)) / 2`` with ``p`` the
      fraction of post-warm-up steps done.
    """
    base, warmup = cfg.base_weight, cfg.warmup_steps
    if step < warmup:
        return base * step / warmup
    if cfg.schedule == "constant":
        return base
    if cfg.schedule == "article":
        value = article_kd_weight(step, base_weight=base, decay_rate=cfg.decay_rate, warmup_steps=warmup)
        return max(value, cfg.min_weight)
    if cfg.schedule == "cosine":
        span = max(total_steps - warmup - 1, 1)
        progress = min((step - warmup) / span, 1.0)
        return cfg.min_weight + (base - cfg.min_weight) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise UserError(f"distill.kd_weight.schedule: {cfg.schedule!r} is not allowed; use constant, article or cosine")


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``lr / warmup_steps`` to ``lr``, then cosine decay to ``min_lr``.

    Step 0 of a warm-up gets ``lr / warmup_steps`` (not 0) so that no optimizer step is wasted;
    the last step (``total_steps - 1``) gets exactly ``min_lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = total_steps - warmup_steps - 1
    if span <= 0:
        return lr
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Phase:
    """A phase of distillation over steps ``[start, end)``."""

    name: str
    start: int
    end: int
    terms: tuple[str, ...]

    @property
    def steps(self) -> int:
        return self.end - self.start


def phase_boundaries(phases: list[PhaseConfig], total_steps: int) -> list[Phase]:
    """Integer step ranges of the phases, summing exactly to ``total_steps``.

    Phases with ``steps`` get that many; the steps left are shared among the phases with a
    ``fraction`` (their fractions must sum to 1) by rounding the *cumulative* fraction, so the
    boundaries are monotone, exact, and never drift. A phase may be empty (0 steps). Fractions
    are read as exact decimals (0.2 is 1/5, not 0.2000000000000000111).

    Unlike the article's float thresholds compared with ``<=``, step ``s`` belongs to the phase
    with ``start <= s < end``: no off-by-one at the boundaries.
    """
    fixed = 0
    fractions: list[Fraction] = []
    for i, p in enumerate(phases):
        key = f"distill.phases[{i}]"
        if (p.fraction is None) == (p.steps is None):
            raise UserError(f"config key '{key}' ({p.name}): give exactly one of fraction or steps")
        if p.steps is not None:
            if p.steps < 0:
                raise UserError(f"config key '{key}.steps': {p.steps} is not allowed; must be >= 0")
            fixed += p.steps
        else:
            if not 0 <= p.fraction <= 1:
                raise UserError(f"config key '{key}.fraction': {p.fraction} is not allowed; must be in [0, 1]")
            fractions.append(Fraction(repr(p.fraction)))
        if not p.terms:
            raise UserError(f"config key '{key}.terms': [] is not allowed; name one or more of kd, ce, feature")
    if fixed > total_steps:
        raise UserError(
            f"config key 'distill.phases': fixed phase steps sum to {fixed}, more than the {total_steps} total steps"
        )
    if fractions and sum(fractions) != 1:
        total = float(sum(fractions))
        raise UserError(f"config key 'distill.phases': phase fractions sum to {total:g}; they must sum to 1")
    if not fractions and fixed != total_steps:
        raise UserError(
            f"config key 'distill.phases': phase steps sum to {fixed}; they must sum to the {total_steps} total steps"
        )
    shared = total_steps - fixed
    out: list[Phase] = []
    start = 0
    cumulative = Fraction(0)
    for p in phases:
        if p.steps is not None:
            length = p.steps
        else:
            before = round(cumulative * shared)
            cumulative += Fraction(repr(p.fraction))
            length = round(cumulative * shared) - before
        out.append(Phase(p.name, start, start + length, tuple(p.terms)))
        start += length
    assert start == total_steps
    return out


def phase_at(plan: list[Phase], step: int) -> Phase:
    """The phase that contains ``step`` (the last one for steps past the end)."""
    for phase in plan:
        if phase.start <= step < phase.end:
            return phase
    return [p for p in plan if p.steps > 0][-1]
