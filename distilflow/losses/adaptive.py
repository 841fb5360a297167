"""The input-adaptive KD weight (the article's "dynamic distillation"): a weight per sample (per
token for LMs) from how sure the teacher is there, on top of the step-wise KD-weight schedule.

Score. At each real position, ``s`` is the teacher's entropy (``source = "entropy"``) or the NLL
of the label (``"correctness"``; positions without a label use the entropy, the expected NLL: see
losses/confidence.py), in nats at ``confidence_temperature``. The raw weight is

    r = exp(-s / tau)      (prefer = "confident": where the teacher is sure / right counts more)
    r = exp(+s / tau)      (prefer = "uncertain": where the teacher spreads its mass counts more)

with the exponent clipped to [-50, 50] (a ratio of e^100 between two positions is "all or
nothing" already; the clip keeps float64 sums finite). ``tau -> inf`` gives the plain schedule.

Normalisation. The weight is ``a = r * n / Z`` with ``Z`` the sum of ``r`` and ``n`` the number
of real positions *of the whole optimizer step* (all micro-batches, all ranks), so the mean of
``a`` over the step's real positions is exactly 1 and the KD term keeps the scale the schedule
gives it. It multiplies the per-position divergence through the KD term's ``mask`` argument
(every KD path, plain / chunked / fused, dense or cached, multiplies its per-row values by
``mask``): ``mask = kd_mask * a``, while the row count that the objective divides by stays the
count of real positions (``Targets.counts``). The KD term of the step is then

    sum_pos a * D / n  =  sum_pos r * D / Z,

the ``r``-weighted mean of the divergence over the step, identical for one batch and for any
split into micro-batches. ``Z`` is a plain sum (float64 with a fixed exponent range, no running
maximum), so micro-batches and ranks add their parts: :func:`step_totals`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distilflow.errors import UserError
from distilflow.losses.confidence import Confidence

SOURCES = ("entropy", "correctness")
PREFERENCES = ("confident", "uncertain")
EXPONENT_CLIP = 50.0
SUMMARY_QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}


@dataclass(frozen=True)
class AdaptiveKD:
    """Settings of the input-adaptive KD weight (see the module docstring)."""

    source: str = "entropy"
    prefer: str = "confident"
    tau: float = 1.0
    confidence_temperature: float = 1.0

    def check(self) -> None:
        """One-line UserErrors for settings that cannot be used."""
        if self.source not in SOURCES:
            raise UserError(f"adaptive KD weight source '{self.source}' is unknown; allowed: {', '.join(SOURCES)}")
        if self.prefer not in PREFERENCES:
            raise UserError(f"adaptive KD weight prefer '{self.prefer}' is unknown; allowed: {', '.join(PREFERENCES)}")
        for name in ("tau", "confidence_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"adaptive KD weight {name} must be a positive number, got {value!r}")


def log_scores(confidence: Confidence, settings: AdaptiveKD) -> torch.Tensor:
    """``log r`` ``(...)`` per position: ``-/+ s / tau``, clipped to [-50, 50], float64."""
    if settings.source == "correctness":
        score = confidence.nll_or_entropy()
    else:
        score = confidence.entropy
    sign = -1.0 if settings.prefer == "confident" else 1.0
    return (sign * score.double() / settings.tau).clamp(-EXPONENT_CLIP, EXPONENT_CLIP)


def _real(log_score: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mask ``(...)`` bool of the real positions (all when ``mask`` is None)."""
    return torch.ones_like(log_score, dtype=torch.bool) if mask is None else mask.bool()


def step_totals(log_scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> tuple[float, int]:
    """``(Z, n)``: the sum of ``r`` and the number of real positions over the micro-batches of a step.

    Shapes: each ``log_scores[i]`` ``(...)`` and ``masks[i]`` the same (True where the KD term counts)
    or None. Under torchrun, sum both over ranks (one all-reduce) before :func:`position_weights`.
    """
    total, count = 0.0, 0
    for log_score, mask in zip(log_scores, masks, strict=True):
        real = _real(log_score, mask)
        total += float(torch.where(real, log_score.exp(), torch.zeros_like(log_score)).sum())
        count += int(real.sum())
    return total, count


def position_weights(log_score: torch.Tensor, mask: torch.Tensor | None, *, total: float, count: int) -> torch.Tensor:
    """``a = r * n / Z`` ``(...)`` at the real positions of one micro-batch, 0 elsewhere (float32).

    ``total`` / ``count``: :func:`step_totals` of the whole step. Multiply into the KD term's mask.
    """
    real = _real(log_score, mask)
    scale = count / total if total > 0 else 0.0
    weights = torch.where(real, log_score.exp() * scale, torch.zeros_like(log_score))
    return weights.float()


def kd_mask(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The KD term's ``mask`` argument: ``mask * weights`` (float), ``weights`` where every position counts."""
    return weights if mask is None else weights * mask.to(weights.dtype)


def summary(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> dict[str, float]:
    """``min``, ``p10``, ``p50``, ``p90``, ``max`` and ``mean`` of the weights at the real positions of
    the step's micro-batches (for metrics.jsonl); an empty dict when there is none."""
    values = torch.cat([w[_real(w, m)].double().reshape(-1) for w, m in zip(weights, masks, strict=True)])
    if values.numel() == 0:
        return {}
    out = {"min": float(values.min())}
    levels = torch.tensor(list(SUMMARY_QUANTILES.values()), dtype=values.dtype, device=values.device)
    quantiles = torch.quantile(values, levels)
    out.update({name: float(q) for name, q in zip(SUMMARY_QUANTILES, quantiles)})
    out.update({"max": float(values.max()), "mean": float(values.mean())})
    return out
