"""How much each of N teachers counts at each position: the combination rules and routing.

Every rule gives weights ``(..., N)``, non-negative and summing to 1 at each position (a sample
for classifiers, a token for LMs); teachers/combine.py mixes the teachers' distributions with them.

- ``mean``: ``1 / N`` each (TextBrewer's multi-teacher averaging).
- ``weights``: fixed positive weights, normalised: ``w_i / sum_j w_j``.
- ``entropy``: ``softmax_i(-H_i / tau)``: the more confident teacher (lower entropy) counts more
  (the idea of EBKD, Kwon et al. 2020, in a normalised form).
- ``correctness``: ``softmax_i(-NLL_i(label) / tau)``: the teacher that gives the label the higher
  probability counts more; with ``tau = 1`` this is ``p_i(label) / sum_j p_j(label)``.
- ``camkd``: ``(1 - softmax_i(NLL_i(label) / tau)) / (N - 1)``, the form published with CA-MKD
  (Zhang, Chen & Wang 2022, "Confidence-Aware Multi-Teacher Knowledge Distillation", eq. 2;
  ``tau = 1`` there). For two teachers it equals ``correctness``; for more it is flatter (no
  teacher gets more than ``1 / (N - 1)``). N >= 2.

``correctness`` and ``camkd`` need a label; at positions without one (``IGNORE_INDEX``: unlabelled
samples, prompt tokens, label-free runs) the ``fallback`` rule applies: ``entropy`` (the default:
the entropy is the teacher's expected NLL, the same quantity with the label unknown), ``weights``
or ``mean``.

Routing: a per-row teacher index (``-1``: no route) gives the routed teacher weight 1 and the
others 0 on every position of that row; rows without a route keep the rule's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distilflow.errors import UserError
from distilflow.losses.confidence import Confidence

RULES = ("mean", "weights", "entropy", "correctness", "camkd")
LABEL_RULES = ("correctness", "camkd")
FALLBACKS = ("entropy", "weights", "mean")
NO_ROUTE = -1


@dataclass(frozen=True)
class Combination:
    """How the teachers combine (the settings of one multi-teacher run).

    ``weights`` the fixed weights (rule ``weights``, or fallback ``weights``); ``tau`` (> 0) the
    sharpness of the adaptive rules (smaller: closer to picking the best teacher; large: ``mean``);
    ``confidence_temperature`` (> 0) the temperature at which entropy and NLL are measured (1: each
    teacher's own prediction, as CA-MKD), independent of the distillation temperature.
    """

    rule: str = "mean"
    weights: tuple[float, ...] | None = None
    tau: float = 1.0
    fallback: str = "entropy"
    confidence_temperature: float = 1.0

    @property
    def adaptive(self) -> bool:
        """Whether the weights depend on the teachers' outputs (so confidences must be computed)."""
        return self.rule in ("entropy", *LABEL_RULES)

    def check(self, teachers: int) -> None:
        """One-line UserErrors for settings that cannot be used with ``teachers`` teachers."""
        if self.rule not in RULES:
            raise UserError(f"teacher combination rule '{self.rule}' is unknown; allowed: {', '.join(RULES)}")
        if self.fallback not in FALLBACKS:
            raise UserError(
                f"teacher combination fallback '{self.fallback}' is unknown; allowed: {', '.join(FALLBACKS)}"
            )
        if self.weights is not None or self.rule == "weights" or self.fallback == "weights":
            fixed_weights(self.weights, teachers=teachers)
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise UserError(f"teacher combination tau must be a positive number, got {self.tau}")
        if not (math.isfinite(self.confidence_temperature) and self.confidence_temperature > 0):
            raise UserError(
                f"teacher confidence_temperature must be a positive number, got {self.confidence_temperature}"
            )
        if self.rule == "camkd" and teachers < 2:
            raise UserError(f"teacher combination rule 'camkd' needs at least 2 teachers, got {teachers}")


def fixed_weights(weights: Sequence[float] | None, *, teachers: int) -> torch.Tensor:
    """``weights`` normalised to sum 1, float64 ``(N,)``; UserError unless there is one positive,
    finite weight per teacher."""
    if weights is None:
        raise UserError(f"teacher combination 'weights' needs a list of {teachers} positive weights, one per teacher")
    values = list(weights)
    if len(values) != teachers:
        raise UserError(f"teacher weights: got {len(values)} weights for {teachers} teachers; give one per teacher")
    bad = [w for w in values if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
    if bad:
        raise UserError(f"teacher weights must be positive numbers, got {bad[0]!r} in {values}")
    out = torch.tensor(values, dtype=torch.float64)
    return out / out.sum()


def _fallback_weights(
    fallback: str, *, teachers: int, entropy: torch.Tensor, weights: Sequence[float] | None, tau: float
) -> torch.Tensor:
    """Weights ``(..., N)`` for positions without a label."""
    if fallback == "entropy":
        return torch.softmax(-entropy / tau, dim=-1)
    if fallback == "weights":
        return fixed_weights(weights, teachers=teachers).to(entropy).expand_as(entropy)
    return torch.full_like(entropy, 1.0 / teachers)


def teacher_weights(
    combination: Combination,
    *,
    teachers: int,
    positions: torch.Size | tuple[int, ...],
    confidences: Sequence[Confidence] | None = None,
    route: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Weights ``(*positions, N)`` of the ``teachers`` at each position (see the module docstring).

    ``confidences``: one :class:`Confidence` per teacher over ``positions`` (needed by the adaptive
    rules; with labels for ``correctness`` / ``camkd``, without them every position falls back);
    ``route`` ``positions`` int, the routed teacher or ``NO_ROUTE``.
    """
    rule, tau = combination.rule, combination.tau
    shape = (*positions, teachers)
    if rule == "mean":
        out = torch.full(shape, 1.0 / teachers, dtype=dtype, device=device)
    elif rule == "weights":
        out = fixed_weights(combination.weights, teachers=teachers).to(dtype=dtype, device=device).expand(shape)
    else:
        if confidences is None or len(confidences) != teachers:
            raise ValueError(f"rule '{rule}' needs one confidence per teacher")
        entropy = torch.stack([c.entropy for c in confidences], -1).to(dtype)  # (..., N)
        if rule == "entropy":
            out = torch.softmax(-entropy / tau, dim=-1)
        else:
            out = _label_rule_weights(combination, confidences, entropy, teachers=teachers, dtype=dtype)
    if route is not None:
        routed = route != NO_ROUTE  # (...)
        one_hot = torch.nn.functional.one_hot(torch.where(routed, route, 0).long(), teachers).to(out.dtype)
        out = torch.where(routed[..., None], one_hot, out)
    return out


def _label_rule_weights(
    combination: Combination,
    confidences: Sequence[Confidence],
    entropy: torch.Tensor,
    *,
    teachers: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``correctness`` / ``camkd`` where a label exists, the fallback elsewhere. ``(..., N)``"""
    tau = combination.tau
    fallback = _fallback_weights(
        combination.fallback, teachers=teachers, entropy=entropy, weights=combination.weights, tau=tau
    )
    if confidences[0].label_nll is None:
        return fallback
    nll = torch.stack([c.label_nll for c in confidences], -1).to(dtype)  # (..., N)
    if combination.rule == "correctness":
        by_label = torch.softmax(-nll / tau, dim=-1)
    else:  # camkd, as published: (1 - softmax(NLL)) / (N - 1)
        by_label = (1.0 - torch.softmax(nll / tau, dim=-1)) / (teachers - 1)
    return torch.where(confidences[0].labelled[..., None], by_label, fallback)


def route_per_position(route: torch.Tensor | None, positions: torch.Size) -> torch.Tensor | None:
    """A per-row route ``(B,)`` broadcast over the row's positions ``(B, T)`` (a view)."""
    if route is None:
        return None
    return route.reshape(*route.shape, *([1] * (len(positions) - route.dim()))).expand(positions)
