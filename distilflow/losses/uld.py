"""Distillation across tokenizers, on the aligned groups of data/align.py: ULD and the GOLD hybrid.

A group is a span of text that the student spells with tokens ``s_1 .. s_m`` and the teacher with
``t_1 .. t_n``. Each side's distribution for the group is its distribution at the group's first
token, times the probabilities of the group's actual later tokens (TRL's GOLD merge):

    q(y) = p(y | context) * prod_{k=2..m} p(s_k | context, s_1 .. s_{k-1})        (V,)

so the entry of the actual first token is the model's probability of the whole span (chain rule).
Both sides condition on the same text (groups start where both tokenizers have a boundary), and
each is computed at temperature ``T``. What is exact and what approximated: docs/CROSS_TOKENIZER.md.

- :func:`uld_loss` (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
  Distillation Loss for LLMs"): the L1 distance between the two ``q`` sorted in decreasing order,
  the shorter vocabulary padded with zeros (the paper's closed form of the Wasserstein-1 distance).
- :func:`hybrid_loss` (TRL's GOLD ``uld_use_hybrid_loss``): a divergence (forward KL by default)
  on the ids both vocabularies share (data/vocab_map.py), each shared id a bucket and one bucket for
  everything else, so that both sides are proper distributions; plus ULD on the ids not shared.
  With one tokenizer on both sides it is the plain divergence of losses/logits.py.

Both return sums over groups scaled by ``T^2`` (losses/logits.py); the caller divides by the
groups of the optimizer step (``reduction="mean"`` divides by this batch's). Groups are taken
``chunk_groups`` at a time and each chunk's gradient is computed at once (as losses/chunked.py):
no ``(groups, V_teacher, V_student)`` tensor exists, and only the gradient ``(B, T, V_student)``
is kept for the backward pass.

The teacher may be dense logits or a :class:`TopkTeacher` (a cross-tokenizer teacher-signal cache:
its top-k log-probabilities per position and the log-probability of each actual next token). Then
ULD compares the k cached values with a zero tail (the cached mass is what is known), and the
hybrid's buckets are the shared ids the teacher cached plus one for the rest on each side, as the
top-k KD of losses/sparse.py; with k = V_teacher both equal the dense losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distilflow.data.align import AlignedSide, Alignment
from distilflow.data.vocab_map import VocabMap
from distilflow.errors import UserError
from distilflow.losses.logits import DIVERGENCES, at_least_float32

REDUCTIONS = ("sum", "mean")
HYBRID_BUCKETS = ("merged", "span")
CHUNK_ELEMENTS = 1 << 21
"""Student + teacher logit entries per chunk when ``chunk_groups`` is 0 (auto): 2M, a quarter of
losses/chunked.py's, because a ULD chunk keeps about 11 float32-sized buffers per entry (softmaxes,
merged and sorted copies, sort indices, their gradients): about 90 MB (benchmarks/cross_tokenizer_loss.py)."""


@dataclass
class TopkTeacher:
    """A teacher of another tokenizer known at its top-k ids per position (a teacher-signal cache).

    ``ids`` ``(B, T, k)`` int64 and ``logprobs`` ``(B, T, k)`` float32, the teacher's largest
    log-probabilities at ``temperature`` (padding ``-inf``); ``next_logprobs`` ``(B, T)`` the
    log-probability at ``temperature`` of the token that actually follows (what a group's merge
    needs); position t predicts teacher token t + 1, as shifted logits; ``vocab_size`` V_teacher.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    next_logprobs: torch.Tensor
    temperature: float
    vocab_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, T, V_teacher)``: the shape of the dense logits this stands for."""
        return (*self.ids.shape[:2], self.vocab_size)


@dataclass
class AlignedParts:
    """``loss`` differentiable; ``matched`` (hybrid only) / ``unmatched`` the detached divergence and ULD
    parts (each ``T^2 *`` its sum, before weights); ``groups`` how many groups they sum over."""

    loss: torch.Tensor
    matched: torch.Tensor | None
    unmatched: torch.Tensor
    groups: int


def _ascending(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``(n, V)`` sorted in increasing order along V, differentiable.

    On CPU numpy sorts (SIMD sorting networks: on AVX-512 ``np.sort`` was 28x and ``np.argsort`` 3x
    faster than ``torch.sort`` at V = 184k, 1 thread); a gather by the sorting order carries the
    gradient. Elsewhere ``torch.sort``.
    """
    if values.device.type != "cpu":
        return values.sort(dim=-1).values
    array = values.detach().numpy()
    if not values.requires_grad:
        return torch.from_numpy(np.sort(array, axis=-1))
    return values.gather(-1, torch.from_numpy(np.argsort(array, axis=-1)))


def sorted_l1(teacher_probs: torch.Tensor, student_probs: torch.Tensor) -> torch.Tensor:
    """Per-row L1 distance between two probability vectors sorted in decreasing order, the shorter
    padded with zeros: ``(n, V_a)``, ``(n, V_b)`` -> ``(n,)``. Either may be unnormalised (merged)."""
    # In increasing order the largest entries are at the end: align the ends, and the longer side's
    # smallest entries meet the padding zeros (|x - 0| = x).
    teacher_sorted, student_sorted = _ascending(teacher_probs), _ascending(student_probs)
    common = min(teacher_sorted.shape[-1], student_sorted.shape[-1])
    teacher_cut, student_cut = teacher_sorted.shape[-1] - common, student_sorted.shape[-1] - common
    distance = (teacher_sorted[:, teacher_cut:] - student_sorted[:, student_cut:]).abs().sum(-1)
    return distance + teacher_sorted[:, :teacher_cut].sum(-1) + student_sorted[:, :student_cut].sum(-1)


def log_missing(log_kept: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``: ``-inf`` at ``x = 0`` with a finite gradient stand-in."""
    below = log_kept < 0
    safe = torch.where(below, log_kept, torch.full_like(log_kept, -1.0))
    return torch.where(below, torch.log(-torch.expm1(safe)), torch.full_like(log_kept, -math.inf))


def _log_rest(log_unshared: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Log of the mass a merged ``q`` leaves outside the shared ids, ``(n,)``: ``c * u + (1 - c)`` with
    ``u`` the unshared mass of ``p`` and ``c`` the span's continuation probability (the mass the merge
    takes away), written so that a tail of 1e-9 is not lost to ``1 - sum`` rounding."""
    x, y = log_unshared + continuation, log_missing(continuation)
    both = torch.isneginf(x) & torch.isneginf(y)
    zero = torch.zeros_like(x)
    rest = torch.logaddexp(torch.where(both, zero, x), torch.where(both, zero, y))
    return torch.where(both, torch.full_like(x, -math.inf), rest)


@dataclass
class _Spec:
    temperature: float
    hybrid: bool
    divergence: str
    beta: float
    matched_weight: float
    unmatched_weight: float
    chunk_groups: int
    shared: tuple[torch.Tensor, torch.Tensor] | None = None  # teacher ids (K,), student ids (K,)
    unshared: tuple[torch.Tensor, torch.Tensor] | None = None  # the other teacher ids, student ids
    topk: bool = False  # the teacher is a TopkTeacher: -inf where it was not cached
    span: bool = False  # buckets "span": the actual span its own bucket (losses/uld_span.py)
    bucket_of: tuple[torch.Tensor, torch.Tensor] | None = None  # (V_t,), (V_s,): an id's bucket, -1 unshared


def _group_terms(
    student_log_p: torch.Tensor,
    student_cont: torch.Tensor,
    teacher_log_p: torch.Tensor,
    teacher_cont: torch.Tensor,
    spec: _Spec,
    firsts: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(divergence sum, ULD sum)`` of a chunk of groups, unscaled; the divergence is 0 for plain ULD.

    ``*_log_p`` ``(n, V)`` log-probabilities at each group's first token, ``*_cont`` ``(n,)`` the log
    continuation probability of the group's later tokens (0 for a one-token span); ``firsts`` the
    student's and the teacher's first token ids ``(n,)`` (span buckets only).
    """
    if spec.span:
        from distilflow.losses.uld_span import span_terms

        return span_terms(student_log_p, student_cont, teacher_log_p, teacher_cont, spec, firsts)
    student_log_q = student_log_p + student_cont[:, None]  # (n, V_s), merged, unnormalised
    teacher_log_q = teacher_log_p + teacher_cont[:, None]  # (n, V_t)
    if not spec.hybrid:
        return torch.zeros((), device=student_log_p.device), sorted_l1(teacher_log_q.exp(), student_log_q.exp()).sum()
    (teacher_shared, student_shared), (teacher_other, student_other) = spec.shared, spec.unshared
    buckets = _topk_buckets(student_log_q, teacher_log_q, spec) if spec.topk else []
    for log_p, log_q, cont, shared, other in (
        (student_log_p, student_log_q, student_cont, student_shared, student_other),
        (teacher_log_p, teacher_log_q, teacher_cont, teacher_shared, teacher_other),
    ):
        if spec.topk:
            break
        unshared = (
            torch.logsumexp(log_p[:, other], dim=-1) if other.numel() else torch.full_like(cont, -math.inf)  # (n,)
        )
        buckets.append(torch.cat([log_q[:, shared], _log_rest(unshared, cont)[:, None]], dim=-1))  # (n, K + 1)
    extra = {"beta": spec.beta} if spec.divergence == "jsd" else {}
    # The buckets are normalised log-probabilities: the divergences' log_softmax at T = 1 leaves them.
    matched = DIVERGENCES[spec.divergence](buckets[0], buckets[1], temperature=1.0, **extra)
    if teacher_other.numel() == 0 and student_other.numel() == 0:
        return matched, torch.zeros((), device=student_log_p.device)
    unmatched = sorted_l1(teacher_log_q[:, teacher_other].exp(), student_log_q[:, student_other].exp()).sum()
    return matched, unmatched


def _topk_buckets(student_log_q: torch.Tensor, teacher_log_q: torch.Tensor, spec: _Spec) -> list[torch.Tensor]:
    """Student and teacher buckets ``(n, K + 1)`` against a top-k teacher: a shared id is a bucket
    where the teacher cached it (else its mass joins the rest on both sides), plus the rest,
    ``log(1 - sum of the buckets)``. With every id cached this is the dense buckets' rest
    (``c * u + 1 - c = 1 - c * (1 - u)``)."""
    teacher_shared, student_shared = spec.shared
    teacher_buckets = teacher_log_q[:, teacher_shared]  # (n, K), -inf where not cached
    cached = ~torch.isneginf(teacher_buckets)
    student_buckets = torch.where(cached, student_log_q[:, student_shared], torch.full_like(teacher_buckets, -math.inf))
    rests = [log_missing(torch.logsumexp(b, dim=-1).clamp(max=0.0)) for b in (student_buckets, teacher_buckets)]
    # fp16 cached values may add up to 1: a teacher rest of 1e-30 where the student's is not empty.
    floor = torch.full_like(rests[1], math.log(1e-30))
    rests[1] = torch.where(torch.isneginf(rests[1]) & ~torch.isneginf(rests[0]), floor, rests[1])
    return [torch.cat([student_buckets, rests[0][:, None]], -1), torch.cat([teacher_buckets, rests[1][:, None]], -1)]


def _teacher_rows(teacher: torch.Tensor | TopkTeacher, rows: torch.Tensor, positions: torch.Tensor, temperature):
    """The teacher's log-probabilities ``(n, V_t)`` at logit rows ``(rows, positions)`` at ``temperature``:
    a log-softmax of dense logits, or the cached top-k values with ``-inf`` elsewhere."""
    if isinstance(teacher, TopkTeacher):
        values = at_least_float32(teacher.logprobs[rows, positions])  # (n, k)
        out = torch.full((len(rows), teacher.vocab_size), -math.inf, dtype=values.dtype, device=values.device)
        return out.scatter_(-1, teacher.ids[rows, positions].long(), values)
    return F.log_softmax(at_least_float32(teacher[rows, positions]).detach() / temperature, dim=-1)


def _continuations(side: AlignedSide, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tokens after each group's first: ``(rows, positions, groups)``, each ``(C,)`` int64."""
    lengths = side.last - side.first  # (G,)
    groups = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)  # (C,)
    starts = torch.cumsum(lengths, 0) - lengths  # (G,) where each group's tokens begin in the flat list
    within = torch.arange(len(groups), device=lengths.device) - starts[groups]
    return batch[groups], side.first[groups] + 1 + within, groups


def _token_log_probs(
    logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor, temperature: float, chunk: int
) -> torch.Tensor:
    """``log softmax(logits[row, position - 1] / T)[id]`` for each token, ``(C,)``, no gradient."""
    out = torch.empty(len(ids), dtype=at_least_float32(logits[:0]).dtype, device=logits.device)
    for start in range(0, len(ids), chunk):
        part = slice(start, start + chunk)
        scaled = at_least_float32(logits[rows[part], positions[part] - 1]) / temperature  # (c, V)
        out[part] = scaled.gather(-1, ids[part, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
    return out


class _AlignedLoss(torch.autograd.Function):
    """Value and student gradient computed chunk by chunk in forward; backward scales the stored gradient.

    A logit row predicts one token, and a token is the first or a later token of at most one group,
    so each student row gets its gradient from one place: the group pass or the continuation pass.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, alignment, spec, grad_enabled):
        need_grad = grad_enabled and ctx.needs_input_grad[0]
        batch, student, teacher = alignment.batch, alignment.student, alignment.teacher
        temperature, count = spec.temperature, alignment.num_groups
        chunk = spec.chunk_groups or max(1, CHUNK_ELEMENTS // (student_logits.shape[-1] + teacher_logits.shape[-1]))
        device, dtype = student_logits.device, at_least_float32(student_logits[:0]).dtype
        conts = []
        for logits, side in ((student_logits, student), (teacher_logits, teacher)):
            rows, positions, groups = _continuations(side, batch)
            if isinstance(logits, TopkTeacher):  # the cache holds each next token's log-probability
                tokens = logits.next_logprobs[rows, positions - 1]
            else:
                ids = side.input_ids[rows, positions]
                tokens = _token_log_probs(logits.detach(), rows, positions, ids, temperature, chunk)
            conts.append(torch.zeros(count, dtype=dtype, device=device).index_add_(0, groups, tokens.to(dtype)))
        student_cont, teacher_cont = conts
        grad = torch.zeros_like(student_logits) if need_grad else None  # (B, T, V_s)
        cont_grad = torch.zeros(count, dtype=dtype, device=device) if need_grad else None  # (G,) d loss / d cont
        matched_total = unmatched_total = torch.zeros((), dtype=dtype, device=device)
        for start in range(0, count, chunk):
            part = slice(start, start + chunk)
            rows, positions = batch[part], student.first[part] - 1
            leaf = at_least_float32(student_logits[rows, positions]).detach().requires_grad_(need_grad)  # (c, V_s)
            cont_leaf = student_cont[part].clone().requires_grad_(need_grad)  # (c,)
            teacher_log_p = _teacher_rows(teacher_logits, batch[part], teacher.first[part] - 1, temperature)
            firsts = (student.input_ids[rows, student.first[part]], teacher.input_ids[rows, teacher.first[part]])
            with torch.enable_grad() if need_grad else torch.no_grad():
                matched, unmatched = _group_terms(
                    F.log_softmax(leaf / temperature, dim=-1),
                    cont_leaf,
                    teacher_log_p,
                    teacher_cont[part],
                    spec,
                    firsts,
                )
                total = temperature**2 * (spec.matched_weight * matched + spec.unmatched_weight * unmatched)
                if need_grad:
                    row_grad, cont_grad[part] = torch.autograd.grad(total, [leaf, cont_leaf])
                    grad.index_put_((rows, positions), row_grad.to(grad.dtype), accumulate=True)
            matched_total = matched_total + temperature**2 * matched.detach()
            unmatched_total = unmatched_total + temperature**2 * unmatched.detach()
        if need_grad:
            _continuation_grad(student_logits, student, batch, cont_grad, grad, temperature, chunk)
        ctx.grad = grad
        loss = spec.matched_weight * matched_total + spec.unmatched_weight * unmatched_total
        ctx.mark_non_differentiable(matched_total, unmatched_total)
        return loss, matched_total, unmatched_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_matched, _grad_unmatched):
        grad = ctx.grad
        ctx.grad = None  # backward runs once; scaled in place
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None


def _continuation_grad(
    student_logits: torch.Tensor,
    student: AlignedSide,
    batch: torch.Tensor,
    cont_grad: torch.Tensor,
    grad: torch.Tensor,
    temperature: float,
    chunk: int,
) -> None:
    """Adds to ``grad`` the gradient through the continuation probabilities: token ``k`` of group ``g``
    has ``d loss / d log p(s_k) = cont_grad[g]``, and ``log p(s_k)`` depends on the logit row before it."""
    rows, positions, groups = _continuations(student, batch)
    ids = student.input_ids[rows, positions]
    for start in range(0, len(ids), chunk):
        part = slice(start, start + chunk)
        leaf = at_least_float32(student_logits[rows[part], positions[part] - 1]).detach().requires_grad_(True)
        with torch.enable_grad():
            token = F.log_softmax(leaf / temperature, dim=-1).gather(-1, ids[part, None])[:, 0]  # (c,)
            (row_grad,) = torch.autograd.grad((token * cont_grad[groups[part]]).sum(), leaf)
        grad.index_put_((rows[part], positions[part] - 1), row_grad.to(grad.dtype), accumulate=True)


def _check(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alignment: Alignment, spec: _Spec, reduction: str
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if spec.chunk_groups < 0:
        raise ValueError(f"chunk_groups must be 0 (auto) or positive, got {spec.chunk_groups}")
    if isinstance(teacher_logits, TopkTeacher) and abs(teacher_logits.temperature - spec.temperature) > 1e-6 * max(
        1.0, spec.temperature
    ):
        raise UserError(
            f"the teacher cache was written at temperature {teacher_logits.temperature:g} but distill.temperature is "
            f"{spec.temperature:g}; they must be equal"
        )
    for name, shape, side in (
        ("student", tuple(student_logits.shape), alignment.student),
        ("teacher", tuple(teacher_logits.shape), alignment.teacher),
    ):
        if len(shape) != 3 or shape[0] != side.input_ids.shape[0]:
            raise ValueError(f"{name}_logits must be (B, T, V) over the alignment's {side.input_ids.shape[0]} rows")
        if alignment.num_groups and int(side.last.max()) - 1 >= shape[1]:
            raise ValueError(f"{name}_logits has {shape[1]} positions; the alignment needs {int(side.last.max())}")


def _run(student_logits, teacher_logits, alignment, spec, reduction) -> AlignedParts:
    _check(student_logits, teacher_logits, alignment, spec, reduction)
    spec.topk = isinstance(teacher_logits, TopkTeacher)
    if spec.topk and spec.span:
        raise UserError(
            "distill.hybrid_buckets span: a teacher-signal cache is not supported yet; use hybrid_buckets=merged "
            "or a live teacher"
        )
    teacher = teacher_logits if spec.topk else teacher_logits.detach()
    loss, matched, unmatched = _AlignedLoss.apply(student_logits, teacher, alignment, spec, torch.is_grad_enabled())
    if reduction == "mean":
        scale = 1.0 / max(alignment.num_groups, 1)
        loss, matched, unmatched = loss * scale, matched * scale, unmatched * scale
    return AlignedParts(loss, matched if spec.hybrid else None, unmatched, alignment.num_groups)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopkTeacher,
    alignment: Alignment,
    *,
    temperature: float = 1.0,
    chunk_groups: int = 0,
    reduction: str = "sum",
) -> AlignedParts:
    """``T^2 * sum_groups L1(sort(q_teacher), sort(q_student))``, the shorter vocabulary zero-padded
    (Boizard et al. 2024, eq. 4-5, with the GOLD merge of multi-token spans: module docstring).

    Shapes: ``student_logits`` ``(B, T_s, V_s)`` and ``teacher_logits`` ``(B, T_t, V_t)`` on the
    alignment's rows (shifted or not: the logit at ``first - 1`` predicts a group's first token);
    V_s and V_t may differ; the teacher may be a :class:`TopkTeacher` instead (module docstring).
    ``chunk_groups`` groups at a time (0: ``CHUNK_ELEMENTS`` logits per chunk).
    ``reduction`` ``sum`` or ``mean`` (over this batch's groups). The teacher gets no gradient.
    """
    spec = _Spec(temperature, False, "forward_kl", 0.5, 0.0, 1.0, chunk_groups)
    return _run(student_logits, teacher_logits, alignment, spec, reduction)


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopkTeacher,
    alignment: Alignment,
    vocab_map: VocabMap,
    *,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    buckets: str = "merged",
    chunk_groups: int = 0,
    reduction: str = "sum",
) -> AlignedParts:
    """GOLD's hybrid: ``T^2 * sum_groups [matched_weight * D(teacher buckets || student buckets)
    + unmatched_weight * L1(sort(q_teacher[unshared]), sort(q_student[unshared]))]``.

    ``buckets`` ``merged`` (GOLD): the buckets of a side are ``q`` at each shared id (``vocab_map``, in the
    same order on both sides) and one for the rest of the mass (unshared ids and what the merge takes
    away), so both sum to 1. ``span``: the actual span is a bucket of its own on both sides, every other
    bucket an event of that model (losses/uld_span.py: ``span_buckets``), and ULD compares those values on the unshared
    ids. ``divergence`` one of losses/logits.py's (``forward_kl``, ``reverse_kl``, ``jsd`` with ``beta``);
    GOLD uses JSD. Shapes and other arguments as :func:`uld_loss`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")
    if buckets not in HYBRID_BUCKETS:
        raise ValueError(f"buckets must be one of {', '.join(HYBRID_BUCKETS)}, got {buckets!r}")
    device = student_logits.device
    shared = (vocab_map.teacher_ids.to(device), vocab_map.student_ids.to(device))
    unshared = []
    for ids, width, name in (
        (shared[0], teacher_logits.shape[-1], "teacher"),
        (shared[1], student_logits.shape[-1], "student"),
    ):
        if ids.numel() and int(ids.max()) >= width:
            raise ValueError(f"the vocabulary map has {name} id {int(ids.max())} but the {name} logits have {width}")
        other = torch.ones(width, dtype=torch.bool, device=device)
        other[ids] = False
        unshared.append(torch.nonzero(other)[:, 0])
    spec = _Spec(
        temperature, True, divergence, beta, matched_weight, unmatched_weight, chunk_groups, shared, tuple(unshared)
    )
    if buckets == "span":
        from distilflow.losses.uld_span import bucket_index

        spec.span = True
        spec.bucket_of = (
            bucket_index(shared[0], teacher_logits.shape[-1]),
            bucket_index(shared[1], student_logits.shape[-1]),
        )
    return _run(student_logits, teacher_logits, alignment, spec, reduction)
