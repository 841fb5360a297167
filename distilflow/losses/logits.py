"""Divergences between teacher and student distributions over classes or vocabulary.

Every function takes logits of shape ``(..., V)`` and returns the *sum* over rows of the
per-row divergence, together with nothing else: callers divide by the number of real rows
(samples or tokens) so that gradient accumulation normalises over the whole optimizer step.
An optional ``mask`` of shape ``(...)`` selects the rows that count.

All divergences are computed at temperature ``T`` on *both* distributions and scaled by
``T**2`` (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", sec. 2),
which keeps gradient magnitudes independent of ``T``. The article's code softened only the
teacher and dropped ``T**2``; see docs/ARTICLE.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 are upcast to float32; float64 stays float64 (references, gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row ``sum p * (log p - log q)`` with ``0 * log 0 = 0``.

    A ``-inf`` logit (a masked or padded vocabulary entry) has ``p = 0``; the plain product
    would give ``0 * -inf = nan``.
    """
    p = log_p.exp()
    # where() on the difference, not the product, so that no nan reaches the backward pass either.
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(-1)


def _tempered(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities, both softened by ``temperature`` (the article softened
    only the teacher)."""
    return (
        F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1),
        F.log_softmax(at_least_float32(teacher_logits) / temperature, dim=-1),
    )


def _rows(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of per-row values ``(...)`` over rows selected by ``mask``."""
    if mask is None:
        return value.sum()
    return (value * mask.to(value.dtype)).sum()


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * sum_rows KL(p_teacher || p_student)`` at temperature ``T``.

    Shapes: ``student_logits`` and ``teacher_logits`` ``(..., V)``; ``mask`` ``(...)`` or None.
    Returns a scalar (sum over the selected rows). Computed in float32 at least (float64 stays float64).
    """
    student_logp, teacher_logp = _tempered(student_logits, teacher_logits, temperature)  # (..., V) each
    per_row = _kl_terms(teacher_logp, student_logp)  # (...)
    return temperature**2 * _rows(per_row, mask)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * sum_rows KL(p_student || p_teacher)``: mode-seeking (Gu et al. 2024, MiniLLM).

    Shapes as :func:`forward_kl`.
    """
    student_logp, teacher_logp = _tempered(student_logits, teacher_logits, temperature)
    per_row = _kl_terms(student_logp, teacher_logp)
    return temperature**2 * _rows(per_row, mask)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (Agarwal et al. 2024, GKD, eq. 3).

    With ``m = beta * p_teacher + (1 - beta) * p_student``:
    ``JSD_beta = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``.
    ``JSD_beta / beta -> KL(p_teacher || p_student)`` (forward KL) as ``beta -> 0`` and
    ``JSD_beta / (1 - beta) -> KL(p_student || p_teacher)`` (reverse KL) as ``beta -> 1``.
    ``beta`` must lie in (0, 1). Shapes as :func:`forward_kl`.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    student_logp, teacher_logp = _tempered(student_logits, teacher_logits, temperature)
    # log m computed stably in log space: logsumexp(log beta + teacher_logp, log(1-beta) + student_logp)
    # An entry that is -inf on both sides has p = q = m = 0 and does not count; give it a finite
    # stand-in, as logsumexp(-inf, -inf) would send nan into the backward pass.
    unreachable = torch.isneginf(teacher_logp) & torch.isneginf(student_logp)
    zero = torch.zeros_like(teacher_logp)
    mixture_logp = torch.logsumexp(
        torch.stack(
            [
                torch.where(unreachable, zero, teacher_logp + math.log(beta)),
                torch.where(unreachable, zero, student_logp + math.log(1.0 - beta)),
            ]
        ),
        dim=0,
    )
    teacher_to_mixture = _kl_terms(teacher_logp, mixture_logp)
    student_to_mixture = _kl_terms(student_logp, mixture_logp)
    per_row = beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture
    return temperature**2 * _rows(per_row, mask)


def cross_entropy_sum(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Hard-label cross-entropy summed over rows whose label is not ``ignore_index``.

    Shapes: ``student_logits`` ``(..., V)``, ``labels`` ``(...)`` integer. Returns a scalar.
    """
    return F.cross_entropy(
        at_least_float32(student_logits).reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}
