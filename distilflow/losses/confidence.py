"""How sure a teacher is at each position: the entropy of its distribution and the negative
log-likelihood (NLL) of the label, for dense logits and for top-k caches.

Two users: the per-position teacher weights of several teachers (teachers/combine.py: lower
entropy or a lower label NLL -> more weight; Zhang et al. 2022, CA-MKD; Kwon et al. 2020,
EBKD) and the input-adaptive KD weight (losses/adaptive.py). Both quantities are in nats and on
one scale: the entropy is the teacher's *expected* NLL of a label drawn from itself, so where a
position has no label it stands in for the NLL.

They are measured at a ``temperature`` of their own (1 by default: the teacher's own prediction,
as the papers do), not necessarily the distillation temperature of the KD term.

A top-k cache (losses/sparse.py) knows the teacher's log-probabilities at the cache temperature on
K ids and the mass of the rest (the tail). Here the tail is taken as spread *uniformly* over the
``V - K`` ids that were not cached (the maximum-entropy guess, and consistent with what is known:
each tail id is below the smallest cached probability). So the entropy is an upper bound of the
true one, the NLL of a label in the tail is ``-log(tail / (V - K))``, and re-tempering to another
temperature treats each tail id alike. Everything is exact when the cache holds all V ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distilflow.losses.chunked import chunk_rows_for, row_slices, teacher_rows
from distilflow.losses.logits import at_least_float32
from distilflow.losses.sparse import SparseTeacher

IGNORE_INDEX = -100
NLL_CAP = 1e4
"""Largest NLL reported (nats): a teacher that gives the label probability 0 (a ``-inf`` logit)
would send ``inf`` into softmaxes over teachers and positions; ``exp(-1e4)`` is 0 anyway."""


@dataclass
class Confidence:
    """Per-position ``entropy`` ``(...)``; ``label_nll`` ``(...)`` (0 where there is no label) and
    ``labelled`` ``(...)`` bool, both None when no labels were given."""

    entropy: torch.Tensor
    label_nll: torch.Tensor | None = None
    labelled: torch.Tensor | None = None

    def nll_or_entropy(self) -> torch.Tensor:
        """The label's NLL where there is a label, the entropy (the expected NLL) elsewhere. ``(...)``"""
        if self.label_nll is None:
            return self.entropy
        return torch.where(self.labelled, self.label_nll, self.entropy)


def entropy_of(log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_v p log p`` over the last axis, with ``0 log 0 = 0`` (``-inf`` log-probs). ``(..., V) -> (...)``

    One ``(..., V)`` buffer: ``p * log p`` in place, its ``0 * -inf = nan`` entries set to 0.
    """
    terms = log_probs.exp().mul_(log_probs)
    return -terms.masked_fill_(terms.isnan(), 0.0).sum(-1)


def _label_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log p(label)`` ``(...)`` (0 where the label is ``IGNORE_INDEX``) and the labelled mask."""
    labelled = labels != IGNORE_INDEX
    safe = torch.where(labelled, labels, 0).long()
    nll = -log_probs.gather(-1, safe[..., None])[..., 0]
    return torch.where(labelled, nll.clamp(max=NLL_CAP), torch.zeros_like(nll)), labelled


def dense_confidence(
    teacher_logits: torch.Tensor, *, labels: torch.Tensor | None = None, temperature: float = 1.0
) -> Confidence:
    """Entropy and label NLL of ``softmax(teacher_logits / temperature)``.

    Shapes: ``teacher_logits`` ``(..., V)``, ``labels`` ``(...)`` with ``IGNORE_INDEX`` where there is none.
    """
    scaled = at_least_float32(teacher_logits)
    log_probs = F.log_softmax(scaled if temperature == 1.0 else scaled / temperature, dim=-1)  # (..., V)
    out = Confidence(entropy_of(log_probs))
    if labels is not None:
        out.label_nll, out.labelled = _label_nll(log_probs, labels)
    return out


def tail_log_share(teacher: SparseTeacher, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: the log-probability of *each* id outside a top-k cache (its tail mass spread
    uniformly, ``-inf`` where the cache covers the vocabulary) and how many such ids there are.

    Shapes: ``teacher.values`` ``(..., K)``; returns two ``(...)`` tensors (float, at the cache temperature).
    """
    values = at_least_float32(teacher.values)
    valid = ~torch.isneginf(values)
    outside = (vocab_size - valid.sum(-1)).to(values.dtype)  # (...)
    mass = 1.0 - torch.where(valid, values.exp(), torch.zeros_like(values)).sum(-1)
    # fp16 rounding can make the cached mass reach 1 while ids remain: floor it (as losses/sparse.py).
    share = torch.log(mass.clamp(min=1e-30)) - torch.log(outside.clamp(min=1.0))
    return torch.where(outside > 0, share, torch.full_like(share, -math.inf)), outside


def expand_topk(teacher: SparseTeacher, vocab_size: int) -> torch.Tensor:
    """The dense log-probabilities ``(..., V)`` a top-k cache stands for: the cached values at their
    ids, the uniform share of the tail everywhere else (at the cache temperature)."""
    share, _ = tail_log_share(teacher, vocab_size)  # (...)
    values = at_least_float32(teacher.values)  # (..., K); padding slots are -inf
    cached = torch.full((*share.shape, vocab_size), -math.inf, dtype=values.dtype, device=values.device)
    # amax, not a plain scatter: a padding slot may name the id of a cached one, and its -inf must not win.
    cached.scatter_reduce_(-1, teacher.ids.long(), values, reduce="amax", include_self=True)
    return torch.where(torch.isneginf(cached), share[..., None], cached)


def topk_confidence(
    teacher: SparseTeacher, *, vocab_size: int, labels: torch.Tensor | None = None, temperature: float = 1.0
) -> Confidence:
    """Entropy and label NLL of a top-k cache re-tempered from its temperature to ``temperature``.

    ``p_T'(v) ∝ p_T(v) ** (T / T')`` for every id, the tail ids each at their uniform share (see the
    module docstring). Shapes: ``teacher.ids`` / ``values`` ``(..., K)``, ``labels`` ``(...)``.
    """
    values = at_least_float32(teacher.values)  # (..., K)
    valid = ~torch.isneginf(values)
    share, outside = tail_log_share(teacher, vocab_size)  # (...) each
    alpha = teacher.temperature / temperature
    log_cached = torch.where(valid, alpha * values, torch.full_like(values, -math.inf))  # unnormalised
    log_each_tail = alpha * share  # -inf where there is no tail
    log_tail_total = log_each_tail + torch.log(outside)  # log(0) = -inf: no tail
    log_norm = torch.logsumexp(torch.cat([log_cached, log_tail_total[..., None]], -1), dim=-1)  # (...)
    log_cached = log_cached - log_norm[..., None]
    log_each_tail = log_each_tail - log_norm
    cached_part = entropy_of(log_cached)
    p_tail = log_each_tail.exp()
    tail_part = torch.where(outside > 0, -outside * p_tail * log_each_tail, torch.zeros_like(p_tail))
    out = Confidence(cached_part + tail_part)
    if labels is not None:
        labelled = labels != IGNORE_INDEX
        hit = (teacher.ids == labels[..., None]) & valid  # (..., K); ids are distinct, so at most one hit
        in_cache = hit.any(-1)
        cached_log_p = torch.where(hit, log_cached, torch.zeros_like(log_cached)).sum(-1)
        nll = -torch.where(in_cache, cached_log_p, log_each_tail)
        out.label_nll = torch.where(labelled, nll.clamp(max=NLL_CAP), torch.zeros_like(nll))
        out.labelled = labelled
    return out


@torch.no_grad()
def signal_confidence(
    signal,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_rows: int = 0,
) -> Confidence:
    """:class:`Confidence` of any teacher signal over all its positions ``(...)``.

    Dense logits ``(..., V)`` and :class:`~distilflow.losses.fused.HiddenStates` are read
    ``chunk_rows`` rows at a time (0: about 8M logits per chunk, as the chunked loss), so no float32
    ``(..., V)`` copy is made; a top-k cache needs ``vocab_size``; a combined teacher
    (teachers/combine.MixedTeacher) answers for itself.
    """
    if hasattr(signal, "confidence"):
        return signal.confidence(labels=labels, temperature=temperature)
    if isinstance(signal, SparseTeacher):
        if vocab_size is None:
            raise ValueError("the confidence of a top-k cache needs vocab_size")
        return topk_confidence(signal, vocab_size=vocab_size, labels=labels, temperature=temperature)
    positions, width = signal.shape[:-1], signal.shape[-1]
    entropy = nll = None
    for index in row_slices(positions, chunk_rows_for(width, chunk_rows)):
        chunk = dense_confidence(
            teacher_rows(signal, index), labels=None if labels is None else labels[index], temperature=temperature
        )
        if entropy is None:
            entropy = torch.empty(positions, dtype=chunk.entropy.dtype, device=chunk.entropy.device)
            nll = torch.zeros_like(entropy) if labels is not None else None
        entropy[index] = chunk.entropy
        if labels is not None:
            nll[index] = chunk.label_nll
    out = Confidence(entropy)
    if labels is not None:
        out.label_nll, out.labelled = nll, labels != IGNORE_INDEX
    return out
