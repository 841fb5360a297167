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

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distilflow.errors import UserError
from distilflow.losses.logits import DIVERGENCES, at_least_float32


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


def sparse_rows(teacher: SparseTeacher, index) -> SparseTeacher:
    """The positions ``index`` of ``teacher`` (any basic index over the position axes)."""
    return SparseTeacher(teacher.ids[index], teacher.values[index], teacher.kind, teacher.temperature)


def check_sparse(teacher: SparseTeacher, *, divergence: str, temperature: float, vocab_size: int) -> None:
    """One-line UserErrors for a sparse teacher that cannot be used as asked."""
    if teacher.kind not in ("topk", "sampled"):
        raise UserError(f"sparse teacher kind '{teacher.kind}' is unknown; allowed: topk, sampled")
    if teacher.kind == "sampled" and divergence != "forward_kl":
        raise UserError(
            f"distill.divergence '{divergence}' cannot use a sampled teacher cache (it estimates forward KL only); "
            "use distill.divergence=forward_kl or a topk cache"
        )
    if abs(teacher.temperature - temperature) > 1e-6 * max(1.0, temperature):
        raise UserError(
            f"the teacher cache was written at temperature {teacher.temperature:g} but distill.temperature is "
            f"{temperature:g}; they must be equal"
        )
    if teacher.ids.numel() and int(teacher.ids.max()) >= vocab_size:
        raise UserError(
            f"the teacher cache holds vocabulary id {int(teacher.ids.max())} but the student scores {vocab_size} ids"
        )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012), floored at log(1e-30).

    The floor keeps a tail that float32 rounds to nothing (the cached ids hold all but < 1e-7 of
    the student's mass) finite; its gradient is then zero.
    """
    x = x.clamp(max=0.0)
    small = x > -math.log(2.0)
    # Each branch is evaluated where it is accurate; the other gets a harmless stand-in argument.
    near = torch.log(torch.clamp(-torch.expm1(torch.where(small, x, torch.full_like(x, -1.0))), min=1e-30))
    far = torch.log1p(-torch.exp(torch.where(small, torch.full_like(x, -1.0), x)))
    return torch.where(small, near, far)


def _bucket_log_probs(
    student_logits: torch.Tensor, teacher: SparseTeacher, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities over ``K + 1`` buckets: the K cached ids and one tail.

    Shapes: ``student_logits`` ``(..., V)``; returns two ``(..., K + 1)`` tensors. Padding slots
    (teacher value ``-inf``) are empty buckets on both sides. The student's tail is
    ``log(1 - sum q_k)`` over the cached ids (``-inf`` when they cover the vocabulary);
    the teacher's is ``log(1 - sum exp(values))``, floored at 1e-30 where the student's tail is
    not empty (fp16 rounding can make the cached mass reach 1) and empty where the student's is.
    """
    log_q = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)  # (..., V)
    values = at_least_float32(teacher.values)  # (..., K)
    valid = ~torch.isneginf(values)
    picked = torch.where(valid, log_q.gather(-1, teacher.ids.long()), torch.full_like(values, -math.inf))  # (..., K)
    # The tail is everything the valid cached ids (distinct by construction) leave: log(1 - sum q_k),
    # from the K picked values alone; a (..., V) mask and a second log-sum over V cost more than the
    # log_softmax itself (measured in benchmarks/cache_throughput.py).
    empty = valid.sum(-1, keepdim=True) >= log_q.shape[-1]  # (..., 1): the cached ids cover the vocabulary
    student_tail = torch.where(empty, -math.inf, _log1mexp(torch.logsumexp(picked, dim=-1, keepdim=True)))
    teacher_mass = values.exp().sum(-1, keepdim=True)
    teacher_tail = torch.where(
        empty,
        torch.full_like(teacher_mass, -math.inf),
        torch.log(torch.clamp(1.0 - teacher_mass, min=1e-30)),
    )
    return torch.cat([picked, student_tail], -1), torch.cat([values, teacher_tail], -1)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """``T^2 * sum_rows D(teacher buckets, student buckets)`` over the ``K + 1`` buckets of a top-k cache.

    The buckets are the K cached ids and one tail holding the rest of the mass on each side, so
    the divergence is that of two proper distributions (a top-k cache that drops the tail, or
    renormalises the K ids, is biased; Anshumann et al. 2025, sec. 3). With K = V (no tail) it
    equals the full divergence. Shapes: ``student_logits`` ``(..., V)``, ``teacher.ids`` /
    ``teacher.values`` ``(..., K)``, ``mask`` ``(...)``. Returns a scalar.
    """
    student_buckets, teacher_buckets = _bucket_log_probs(student_logits, teacher, temperature)
    # The bucket log-probabilities are normalised already; the divergences' log_softmax at T = 1
    # leaves them unchanged (and renormalises fp16-rounded teacher mass).
    extra = {"beta": beta} if divergence == "jsd" else {}
    value = DIVERGENCES[divergence](student_buckets, teacher_buckets, temperature=1.0, mask=mask, **extra)
    return temperature**2 * value


def sampled_forward_kl(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T^2 * sum_rows sum_k w_k * (-log q_T(id_k))``: forward KL up to the teacher's entropy.

    ``teacher.ids`` were drawn from the teacher's ``p_T`` and ``teacher.values`` are their weights
    (summing to 1 per position), so ``sum_k w_k * (-log q_T(id_k))`` is an unbiased estimate of the
    cross-entropy ``-sum_v p_T(v) log q_T(v)`` = ``KL(p_T || q_T) + H(p_T)``. ``H(p_T)`` does not
    depend on the student: the gradient is an unbiased estimate of forward KL's gradient
    (Anshumann et al. 2025, "Sparse Logit Sampling"); the value is KL plus a constant. Forward KL
    only: reverse KL and JSD need ``q_T * log p_T`` at ids that were not drawn.
    Shapes as :func:`topk_divergence`. Returns a scalar.
    """
    log_q = F.log_softmax(at_least_float32(student_logits) / temperature, dim=-1)  # (..., V)
    weights = at_least_float32(teacher.values)  # (..., K); padding slots weigh 0
    per_row = -(weights * log_q.gather(-1, teacher.ids.long())).sum(-1)  # (...)
    if mask is not None:
        per_row = per_row * mask.to(per_row.dtype)
    return temperature**2 * per_row.sum()


def sparse_divergence(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """The KD term against a sparse teacher: :func:`topk_divergence` or :func:`sampled_forward_kl`."""
    check_sparse(teacher, divergence=divergence, temperature=temperature, vocab_size=student_logits.shape[-1])
    if teacher.kind == "sampled":
        return sampled_forward_kl(student_logits, teacher, temperature=temperature, mask=mask)
    return topk_divergence(
        student_logits, teacher, divergence=divergence, temperature=temperature, mask=mask, beta=beta
    )


def kd_divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
) -> torch.Tensor:
    """The KD term against dense teacher logits ``(..., V)`` (losses/logits.py) or a :class:`SparseTeacher`
    (:func:`sparse_divergence`). ``student_logits`` ``(..., V)``, ``mask`` ``(...)``. Returns a scalar."""
    if isinstance(teacher, SparseTeacher):
        return sparse_divergence(
            student_logits, teacher, divergence=divergence, temperature=temperature, mask=mask, beta=beta
        )
    extra = {"beta": beta} if divergence == "jsd" else {}
    return DIVERGENCES[divergence](student_logits, teacher, temperature=temperature, mask=mask, **extra)
