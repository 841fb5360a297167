"""The ``span`` buckets of the cross-tokenizer hybrid (``distill.hybrid_buckets: span``; losses/uld.py's
``hybrid_loss`` with ``buckets="span"``): the actual text span is a bucket of its own on both sides and
every other bucket an event of that model, where GOLD's ``merged`` buckets put a nested span's mass on its
first token. What is exact and what approximated: docs/CROSS_TOKENIZER.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from distilflow.losses.logits import DIVERGENCES
from distilflow.losses.uld import log_missing, sorted_l1


def bucket_index(ids: torch.Tensor, width: int) -> torch.Tensor:
    """``(width,)``: each id's bucket (its place in the shared ``ids``), -1 for an id not shared."""
    return torch.full((width,), -1, dtype=torch.long, device=ids.device).index_copy_(
        0, ids, torch.arange(len(ids), device=ids.device)
    )


def logsumexp_or_neginf(values: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last axis, ``-inf`` (with a zero gradient, not nan) where every entry is ``-inf``."""
    empty = torch.isneginf(values).all(-1)
    out = torch.logsumexp(torch.where(empty[..., None], torch.zeros_like(values), values), dim=-1)
    return torch.where(empty, torch.full_like(out, -math.inf), out)


def span_buckets(
    log_p: torch.Tensor, cont: torch.Tensor, first: torch.Tensor, dropped: torch.Tensor, shared, other
) -> tuple[torch.Tensor, torch.Tensor]:
    """One side's buckets ``(n, K + 2)`` of the ``span`` hybrid, and its log-values on the unshared ids.

    Every bucket is an event of this model at the group's first token: the actual span (``p(a) c``, ``a``
    the first token, ``c`` the continuation probability: the chain rule, the same text on both sides),
    each shared id ``y`` (``p(y)``; for ``a`` itself ``p(a) (1 - c)``, ``a`` then other text), and the
    rest (the unshared ids). ``dropped`` ``(n, 2)`` bucket indices (-1: none) of both sides' first tokens:
    their values join the rest on both sides alike (the two first tokens are different events across
    the vocabularies once their span is taken out). The buckets sum to 1.
    """
    rows = torch.arange(len(first), device=first.device)
    head = log_p[rows, first]  # (n,)
    values = log_p.scatter(1, first[:, None], (head + log_missing(cont))[:, None])  # (n, V): a's leftover
    buckets = values[:, shared]  # (n, K)
    drop = torch.zeros_like(buckets, dtype=torch.bool)
    for column in dropped.unbind(1):
        keep = column >= 0
        drop[rows[keep], column[keep]] = True
    moved = torch.where(drop, buckets, torch.full_like(buckets, -math.inf))
    rest = logsumexp_or_neginf(torch.cat([values[:, other], moved], dim=-1))  # (n,)
    buckets = torch.where(drop, torch.full_like(buckets, -math.inf), buckets)
    return torch.cat([buckets, rest[:, None], (head + cont)[:, None]], dim=-1), values[:, other]


def span_terms(student_log_p, student_cont, teacher_log_p, teacher_cont, spec: Any, firsts):
    """The ``span`` hybrid of a chunk: the divergence of :func:`span_buckets`, ULD on the unshared ids' values."""
    (teacher_shared, student_shared), (teacher_other, student_other) = spec.shared, spec.unshared
    student_first, teacher_first = firsts
    dropped = torch.stack([spec.bucket_of[1][student_first], spec.bucket_of[0][teacher_first]], dim=1)  # (n, 2)
    student_buckets, student_rest = span_buckets(
        student_log_p, student_cont, student_first, dropped, student_shared, student_other
    )
    teacher_buckets, teacher_rest = span_buckets(
        teacher_log_p, teacher_cont, teacher_first, dropped, teacher_shared, teacher_other
    )
    extra = {"beta": spec.beta} if spec.divergence == "jsd" else {}
    matched = DIVERGENCES[spec.divergence](student_buckets, teacher_buckets, temperature=1.0, **extra)
    if teacher_other.numel() == 0 and student_other.numel() == 0:
        return matched, torch.zeros((), device=student_log_p.device)
    return matched, sorted_l1(teacher_rest.exp(), student_rest.exp()).sum()
