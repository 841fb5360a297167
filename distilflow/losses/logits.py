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
    Returns a scalar (sum over the selected rows). Computed in float32 at least.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    per_row = (t.exp() * (t - s)).sum(-1)  # (...)
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
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_row = (s.exp() * (s - t)).sum(-1)
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
    ``beta -> 0`` behaves like forward KL, ``beta -> 1`` like reverse KL (both scaled by beta).
    ``beta`` must lie in (0, 1). Shapes as :func:`forward_kl`.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # log m computed stably in log space: logsumexp(log beta + t, log(1-beta) + s)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
    kl_t = (t.exp() * (t - m)).sum(-1)
    kl_s = (s.exp() * (s - m)).sum(-1)
    per_row = beta * kl_t + (1.0 - beta) * kl_s
    return temperature**2 * _rows(per_row, mask)


def cross_entropy_sum(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100) -> torch.Tensor:
    """Hard-label cross-entropy summed over rows whose label is not ``ignore_index``.

    Shapes: ``student_logits`` ``(..., V)``, ``labels`` ``(...)`` integer. Returns a scalar.
    """
    return F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}
