"""KD + CE over rows in chunks: the full fp32 ``[N, V]`` softmax (and its backward) never exists at once.

The plain losses (losses/logits.py) upcast ``[N, V]`` logits to float32, take two softmaxes,
their logs, products and sums, and autograd keeps most of them for the backward pass: about
seven ``[N, V]`` float32 tensors at the peak (docs/BENCHMARKS.md). Here the rows (tokens) are
taken ``chunk_rows`` at a time: for each chunk the *same* functions of losses/logits.py (and
losses/sparse.py for cached teachers) give the loss and, right away, its gradient with respect to
that chunk of logits; the chunk's intermediates are freed before the next one. Only the gradient
``[N, V]`` (in the logits' dtype) is kept for the backward pass, which then just scales it. The
same idea, applied to the lm_head matmul as well, is losses/fused.py.

Every term is a *sum over rows*, exactly as in losses/logits.py; the result combines the active
terms with the caller's coefficients (``kd_weight * kd + ce_weight * ce``), and the parts are
returned as detached sums for logging.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from distilflow.losses.logits import at_least_float32, cross_entropy_sum
from distilflow.losses.sparse import SparseTeacher, check_sparse, kd_divergence, sparse_rows

IGNORE_INDEX = -100
DEFAULT_CHUNK_ELEMENTS = 1 << 23
"""Logit entries per chunk when ``chunk_rows`` is 0 (auto): 8M entries, 32 MiB per float32 copy (64 rows
at V = 128k). Smaller chunks save little more (the lm_head gradient dominates) and cost time: each
chunk streams the whole lm_head through the matmuls again (docs/BENCHMARKS.md)."""


@runtime_checkable
class LazyTeacher(Protocol):
    """A teacher whose dense logits are made on demand, rows at a time, without gradient: final hidden
    states with the teacher's lm_head (losses/fused.HiddenStates) or several teachers mixed
    (teachers/combine.MixedTeacher). ``shape`` is that of the logits ``(..., V)``; ``logits_at(index)``
    gives the logits of the positions ``index`` (any basic index over them). The chunked and fused
    losses ask for one chunk at a time; the plain loss for all rows at once (``logits_at()``)."""

    @property
    def shape(self) -> torch.Size: ...

    def logits_at(self, index: tuple = (...,)) -> torch.Tensor: ...


Teacher = torch.Tensor | SparseTeacher | LazyTeacher | None


@dataclass(frozen=True)
class LossSpec:
    """Which terms a chunked (or fused) pass computes and how they combine.

    ``kd_weight`` / ``ce_weight``: coefficient of the KD / CE *sum* in the returned loss; None
    switches the term off. The objective passes ``weight / rows of the optimizer step``.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float | None = None
    ce_weight: float | None = None


@dataclass
class LossParts:
    """``loss`` the differentiable combination; ``kd`` / ``ce`` detached sums over rows (None when off)."""

    loss: torch.Tensor
    kd: torch.Tensor | None
    ce: torch.Tensor | None


def chunk_rows_for(vocab_size: int, chunk_rows: int = 0) -> int:
    """``chunk_rows`` if given (> 0), else as many rows as keep a chunk at ``DEFAULT_CHUNK_ELEMENTS`` logits."""
    if chunk_rows > 0:
        return chunk_rows
    return max(8, DEFAULT_CHUNK_ELEMENTS // max(vocab_size, 1))


def row_slices(leading: torch.Size | tuple[int, ...], chunk_rows: int) -> Iterator[tuple]:
    """Index tuples covering every position of shape ``leading`` (e.g. ``(B, T)``), each at most
    ``chunk_rows`` consecutive positions of the last axis (so a chunk of logits is a view, not a copy)."""
    if len(leading) == 0:
        yield ()
        return
    *outer, last = leading
    for prefix in itertools.product(*(range(n) for n in outer)):
        for start in range(0, last, chunk_rows):
            yield (*prefix, slice(start, min(start + chunk_rows, last)))


def teacher_rows(teacher: Teacher, index: tuple):
    """Rows ``index`` of a teacher: dense logits, a SparseTeacher, or a :class:`LazyTeacher` (its logits there)."""
    if teacher is None:
        return None
    if isinstance(teacher, SparseTeacher):
        return sparse_rows(teacher, index)
    if isinstance(teacher, torch.Tensor):
        return teacher[index]
    if isinstance(teacher, LazyTeacher):
        return teacher.logits_at(index)  # no gradient
    raise TypeError(f"a teacher signal of type {type(teacher).__name__} is not dense, sparse or lazy logits")


def chunk_terms(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """KD and CE sums of one chunk, by the plain functions. ``student_logits`` ``(n, V)``."""
    kd = ce = None
    if spec.kd_weight is not None:
        kd = kd_divergence(
            student_logits, teacher, divergence=spec.divergence, temperature=spec.temperature, mask=mask, beta=spec.beta
        )
    if spec.ce_weight is not None:
        ce = cross_entropy_sum(student_logits, labels, ignore_index=IGNORE_INDEX)
    return kd, ce


def forward_kl_ce_value_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward KL and CE of one chunk ``(n, V)`` with their gradient written out by hand, in place:
    about four ``(n, V)`` float32 buffers instead of the ten or so that autograd keeps.

    ``d/ds [T^2 KL(p_T || q_T)] = T * (q_T - p_T)`` and ``d/ds CE = softmax(s) - onehot(label)``
    for the student's logits ``s`` (the same functions as losses/logits.py; tested equal to them).
    """
    student = at_least_float32(student_logits)  # (n, V); not written to (it may be the caller'student tensor)
    zero = torch.zeros((), device=student.device)
    kd = ce = zero
    grad = None
    if spec.kd_weight is not None:
        temperature = spec.temperature
        log_q = student / temperature
        log_q -= torch.logsumexp(log_q, dim=-1, keepdim=True)  # (n, V) student log-probs at T
        log_p = at_least_float32(teacher_logits) / temperature
        log_p -= torch.logsumexp(log_p, dim=-1, keepdim=True)  # (n, V) teacher log-probs at T
        p = log_p.exp()
        terms = log_p.sub_(log_q)  # log p - log q, in log_p'student buffer
        terms.masked_fill_(p == 0, 0.0).mul_(p)  # 0 * log 0 = 0, as _kl_terms
        per_row = terms.sum(-1)  # (n,)
        del terms, log_p
        row_weight = torch.full_like(per_row, spec.kd_weight * temperature)
        if mask is not None:
            per_row = per_row * mask.to(per_row.dtype)
            row_weight = row_weight * mask.to(per_row.dtype)
        kd = temperature**2 * per_row.sum()
        grad = log_q.exp_().sub_(p).mul_(row_weight[:, None])  # T * (q - p), weighted, in log_q'student buffer
        del p
    if spec.ce_weight is not None:
        valid = labels != IGNORE_INDEX  # (n,)
        safe = torch.where(valid, labels, 0).long()[:, None]
        lse = torch.logsumexp(student, dim=-1, keepdim=True)  # (n, 1)
        ce = ((lse - student.gather(-1, safe))[:, 0] * valid.to(student.dtype)).sum()
        soft = (student - lse).exp_()  # softmax(student)
        soft.scatter_add_(-1, safe, -valid.to(student.dtype)[:, None])  # - onehot(label) on labelled rows
        soft.mul_((spec.ce_weight * valid.to(student.dtype))[:, None])
        grad = soft if grad is None else grad.add_(soft)
    return kd, ce, grad


def chunk_value_and_grad(
    student_logits: torch.Tensor,
    teacher,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    spec: LossSpec,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """KD sum, CE sum (zeros when off) and the gradient of ``kd_weight * kd + ce_weight * ce``
    with respect to the chunk ``(n, V)`` (None unless ``need_grad``)."""
    dense = teacher is None or isinstance(teacher, torch.Tensor)
    if need_grad and dense and (spec.kd_weight is None or spec.divergence == "forward_kl"):
        kd, ce, grad = forward_kl_ce_value_and_grad(student_logits, teacher, labels, mask, spec)
        return kd, ce, grad.to(student_logits.dtype)
    leaf = student_logits.detach().requires_grad_(need_grad)
    with torch.enable_grad() if need_grad else torch.no_grad():
        kd, ce = chunk_terms(leaf, teacher, labels, mask, spec)
        total = 0.0
        if kd is not None:
            total = total + spec.kd_weight * kd
        if ce is not None:
            total = total + spec.ce_weight * ce
        grad = torch.autograd.grad(total, leaf)[0] if need_grad and torch.is_tensor(total) else None
    zero = torch.zeros((), device=student_logits.device)
    return (
        kd.detach() if kd is not None else zero,
        ce.detach() if ce is not None else zero,
        grad,
    )


def run_chunks(
    student_at: Callable[[tuple], torch.Tensor],
    teacher,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    spec: LossSpec,
    slices: list[tuple],
    need_grad: bool,
    on_grad: Callable[[tuple, torch.Tensor], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop shared by the chunked and the fused loss: per chunk, value and gradient; the
    gradient is handed to ``on_grad(index, grad)``. Returns the KD and CE sums."""
    kd_total = ce_total = None
    for index in slices:
        kd, ce, grad = chunk_value_and_grad(
            student_at(index),
            teacher_rows(teacher, index),
            labels[index] if labels is not None else None,
            mask[index] if mask is not None else None,
            spec,
            need_grad,
        )
        kd_total = kd if kd_total is None else kd_total + kd
        ce_total = ce if ce_total is None else ce_total + ce
        if grad is not None:
            on_grad(index, grad)
    return kd_total, ce_total


def combine(kd: torch.Tensor, ce: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=kd.device)
    if spec.kd_weight is not None:
        total = total + spec.kd_weight * kd
    if spec.ce_weight is not None:
        total = total + spec.ce_weight * ce
    return total


def check_terms(teacher, labels: torch.Tensor | None, spec: LossSpec, vocab_size: int) -> None:
    if spec.kd_weight is not None and teacher is None:
        raise ValueError("the KD term needs a teacher")
    if spec.ce_weight is not None and labels is None:
        raise ValueError("the CE term needs labels")
    if isinstance(teacher, SparseTeacher) and spec.kd_weight is not None:
        check_sparse(teacher, divergence=spec.divergence, temperature=spec.temperature, vocab_size=vocab_size)


class _ChunkedKDCE(torch.autograd.Function):
    """Loss value and gradient computed chunk by chunk in forward; backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, student_logits, teacher, labels, mask, spec, chunk_rows, grad_enabled):
        # needs_input_grad is True under torch.no_grad too; evaluation must not pay for gradients.
        need_grad = grad_enabled and ctx.needs_input_grad[0]
        grad = torch.empty_like(student_logits) if need_grad else None  # (..., V), the logits' dtype

        def keep(index, chunk_grad):
            grad[index] = chunk_grad

        slices = list(row_slices(student_logits.shape[:-1], chunk_rows))
        kd, ce = run_chunks(lambda i: student_logits[i], teacher, labels, mask, spec, slices, need_grad, keep)
        ctx.grad = grad
        ctx.mark_non_differentiable(kd, ce)
        return combine(kd, ce, spec), kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad = ctx.grad
        ctx.grad = None  # backward runs once; scaled in place, so no second (..., V) buffer
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None, None


def chunked_kd_ce(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    kd_weight: float | None = 1.0,
    ce_weight: float | None = None,
    chunk_rows: int = 0,
    vocab_size: int | None = None,
) -> LossParts:
    """``kd_weight * KD + ce_weight * CE``, each a sum over rows, computed ``chunk_rows`` rows at a time.

    Shapes: ``student_logits`` ``(..., V)``; ``teacher`` dense logits ``(..., V)``, a
    :class:`SparseTeacher` over the same positions, or None (CE only); ``labels`` ``(...)`` with
    ``IGNORE_INDEX`` where there is no hard label; ``mask`` ``(...)`` the rows of the KD term.
    ``vocab_size`` cuts both sides to their first ids (the shared-vocabulary cut). Values and
    gradients equal those of :func:`losses.logits.forward_kl` (etc.) and ``cross_entropy_sum``;
    the teacher gets no gradient. ``chunk_rows`` 0 picks about 8M logits per chunk.
    """
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        if isinstance(teacher, torch.Tensor):
            teacher = teacher[..., :vocab_size]
    spec = LossSpec(divergence, temperature, beta, kd_weight, ce_weight)
    check_terms(teacher, labels, spec, student_logits.shape[-1])
    if isinstance(teacher, torch.Tensor):
        teacher = teacher.detach()
    rows = chunk_rows_for(student_logits.shape[-1], chunk_rows)
    loss, kd, ce = _ChunkedKDCE.apply(student_logits, teacher, labels, mask, spec, rows, torch.is_grad_enabled())
    return LossParts(loss, kd if kd_weight is not None else None, ce if ce_weight is not None else None)
