"""The objective: for the current phase, the active loss terms, their weights, and the total.

Phase -> terms -> weights -> total and parts. Each term is a *sum over rows* divided by the
number of real rows in the whole optimizer step (all micro-batches), so gradient accumulation
gives the same loss and gradient as one big batch (the article's ``batchmean`` on
``[batch, seq, vocab]`` divided by the batch size only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from distilflow.losses.chunked import LazyTeacher, LossParts, chunked_kd_ce
from distilflow.losses.features import FEATURE_LOSSES
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.logits import cross_entropy_sum
from distilflow.losses.sparse import SparseTeacher, kd_divergence
from distilflow.schedules import Phase, kd_weight, phase_at

if TYPE_CHECKING:
    from distilflow.data.align import Alignment
    from distilflow.losses.aligned_kd import AlignedKD

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "plain", "chunked", "fused")
RESOLVED_IMPLS = ("plain", "chunked", "fused")
AUTO_FUSED_LOGITS = 1 << 20
"""Causal LMs: ``auto`` picks ``fused`` once one micro-batch's logits hold this many entries (1M).
Measured (docs/BENCHMARKS.md, "auto's crossover"): from 1M entries on, fused holds 0.57-0.70x of
plain's loss memory (0.4x at 16M, 0.11x at 64M) at plain's CPU time within the noise of the
measurement up to 16M entries (a single chunk); below, the loss needs under 50 MiB either way."""
AUTO_LARGE_LOGITS = 1 << 25
"""Classifiers (no lm_head to fuse): ``auto`` picks ``chunked`` from 32M entries (128 MiB in float32,
so the plain loss, about seven such tensors at its peak, would pass 0.9 GiB)."""


def choose_loss_impl(setting: str, *, rows: int, vocab_size: int, hidden_states: bool) -> str:
    """The loss implementation for ``rows`` scored positions of ``vocab_size`` logits per micro-batch.

    ``auto``: where the model can give hidden states and its lm_head (``hidden_states``: causal LMs),
    ``fused`` from ``AUTO_FUSED_LOGITS`` logit entries, ``plain`` below; for classifiers ``chunked``
    from ``AUTO_LARGE_LOGITS``, ``plain`` below. An explicit ``fused`` without hidden states
    (classifiers, whose logits are the model's output) is ``chunked``.
    """
    if setting not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {', '.join(LOSS_IMPLS)}, got {setting!r}")
    if setting == "auto":
        if hidden_states:
            return "fused" if rows * vocab_size >= AUTO_FUSED_LOGITS else "plain"
        return "chunked" if rows * vocab_size >= AUTO_LARGE_LOGITS else "plain"
    if setting == "fused" and not hidden_states:
        return "chunked"
    return setting


@dataclass
class Outputs:
    """What a model produced for a batch.

    ``logits`` ``(B, C)`` for classifiers or ``(B, T, V)`` for language models; for the fused loss a
    :class:`HiddenStates` (final hidden states and lm_head) instead; a teacher cache may give a
    :class:`SparseTeacher`; several teachers give their mixture (a :class:`LazyTeacher`, or a
    :class:`SparseTeacher` over the union of their top-k ids). ``features`` the tapped intermediate
    outputs in the order of the configured layer pairs.
    """

    logits: torch.Tensor | HiddenStates | SparseTeacher | LazyTeacher
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Targets:
    """What the student is scored against in a micro-batch.

    ``labels`` ``(B,)`` or ``(B, T)`` with ``IGNORE_INDEX`` where there is no hard label (an
    unlabeled transfer sample, padding, a prompt token); ``kd_mask`` ``(B,)`` or ``(B, T)``, True
    where the teacher's distribution counts (every sample; every real, non-prompt token);
    ``feature_mask`` ``(B, T)`` for token features (hidden states of every real input position;
    their length is T, not the T - 1 of shifted logits), None to reuse ``kd_mask``.

    ``alignment`` (a teacher of another tokenizer, data/align.py): the batch's aligned groups; then
    ``kd_mask`` marks the logit row that predicts each group's first token and ``feature_mask`` each
    group's last token (so both count groups), and the KD and feature terms compare groups.

    ``kd_weight`` ``(B,)`` or ``(B, T)`` float: the input-adaptive KD weight of each position
    (losses/adaptive.py; mean 1 over the optimizer step's real positions), None for weight 1. It
    multiplies the KD term's per-position divergence; ``kd_mask`` stays boolean, because the row
    counts (:meth:`counts`) and the feature term read it. ``route`` ``(B,)`` or ``(B, T)`` int: the
    teacher each position is distilled from when several teachers are routed by a data column
    (teachers/multi.py; -1: no route), None without routing.
    """

    labels: torch.Tensor
    kd_mask: torch.Tensor
    feature_mask: torch.Tensor | None = None
    alignment: Alignment | None = None
    kd_weight: torch.Tensor | None = None
    route: torch.Tensor | None = None

    def kd_rows(self, per_token: bool) -> torch.Tensor | None:
        """The KD functions' ``mask`` argument: ``kd_mask`` (LMs) or None (classifiers: every sample),
        times ``kd_weight`` when there is one."""
        mask = self.kd_mask if per_token else None
        if self.kd_weight is None:
            return mask
        return self.kd_weight if mask is None else self.kd_weight * mask.to(self.kd_weight.dtype)

    def counts(self, per_token: bool) -> dict[str, int]:
        """Rows that each term averages over."""
        kd_rows = int(self.kd_mask.sum())
        if not per_token:
            feature_rows = int(self.kd_mask.shape[0])
        else:
            feature_rows = int(self.feature_mask.sum()) if self.feature_mask is not None else kd_rows
        return {"kd": kd_rows, "ce": int((self.labels != IGNORE_INDEX).sum()), "feature": feature_rows}


def uses_teacher(terms: tuple[str, ...] | list[str]) -> bool:
    """Whether loss terms need teacher outputs (the KD and feature terms do; CE does not)."""
    return "kd" in terms or "feature" in terms


def add_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {k: total.get(k, 0) + v for k, v in more.items()}


class Objective(nn.Module):
    """Combines the active terms of the phase at ``step``.

    ``heads`` (one projection head per layer pair, see models/heads.py) are trained with the
    student; they live here because the feature term is their only user. ``loss_impl`` (plain,
    chunked or fused) and ``chunk_rows`` are the stage's resolved ``distill.loss_impl`` and
    ``distill.loss_chunk_rows``: the task was built with the same values (fused: it gives hidden
    states instead of logits), so the two never decide apart. ``aligned``: the KD term across
    tokenizers (losses/uld.py), used on batches whose targets carry an alignment.
    """

    def __init__(
        self,
        plan: list[Phase],
        *,
        total_steps: int,
        kd_schedule=None,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        ce_weight: float = 1.0,
        feature_weight: float = 1.0,
        feature_loss: str = "normalized_mse",
        layer_weights: list[float] | None = None,
        heads: nn.ModuleList | None = None,
        per_token: bool = False,
        loss_impl: str = "plain",
        chunk_rows: int = 0,
        aligned: AlignedKD | None = None,
    ) -> None:
        super().__init__()
        self.aligned = aligned
        self.plan = plan
        self.total_steps = total_steps
        self.kd_schedule = kd_schedule
        self.temperature = temperature
        self.divergence = divergence
        self.jsd_beta = jsd_beta
        self.ce_weight = ce_weight
        self.feature_weight = feature_weight
        self.feature_loss = feature_loss
        self.layer_weights = layer_weights or []
        self.heads = heads if heads is not None else nn.ModuleList()
        self.per_token = per_token
        if loss_impl not in RESOLVED_IMPLS:  # decided once per stage (choose_loss_impl), never here
            raise ValueError(f"loss_impl must be one of {', '.join(RESOLVED_IMPLS)} (resolved), got {loss_impl!r}")
        self.loss_impl = loss_impl
        self.chunk_rows = chunk_rows

    @property
    def needs_teacher(self) -> bool:
        return any(uses_teacher(p.terms) for p in self.plan)

    def phase(self, step: int) -> Phase:
        return phase_at(self.plan, step)

    def weights(self, step: int) -> dict[str, float]:
        """Weight of each term active at ``step``."""
        out = {}
        for term in self.phase(step).terms:
            if term == "kd":
                out["kd"] = kd_weight(step, self.total_steps, self.kd_schedule)
            elif term == "ce":
                out["ce"] = self.ce_weight
            elif term == "feature":
                out["feature"] = self.feature_weight
        return out

    def forward(
        self,
        step: int,
        student: Outputs,
        teacher: Outputs | None,
        targets: Targets,
        rows: dict[str, int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss of a micro-batch and each (unweighted) part, normalised by ``rows``.

        ``rows`` holds the row counts of the whole optimizer step (see :meth:`Targets.counts`).
        """
        weights = self.weights(step)
        parts: dict[str, torch.Tensor] = {}
        loss = None
        if "kd" in weights or "ce" in weights:
            impl = self.loss_impl
            self.check_outputs(student.logits)
            if targets.alignment is not None and "kd" in weights:  # CE alone needs no alignment
                loss, aligned_parts = self.aligned_terms(weights, student, teacher, targets, rows)
                parts.update(aligned_parts)
            elif impl == "plain":
                parts.update(self.plain_terms(weights, student, teacher, targets, rows))
            else:
                # One pass computes both terms; the loss carries the gradient, the parts are logged values.
                done = self.large_vocab_terms(impl, weights, student, teacher, targets, rows)
                loss = done.loss
                if done.kd is not None:
                    parts["kd"] = done.kd / max(rows["kd"], 1)
                if done.ce is not None:
                    parts["ce"] = done.ce / max(rows["ce"], 1)
        weighted = {k: v for k, v in parts.items() if loss is None}  # not yet in a one-pass loss
        if "feature" in weights:
            parts["feature"] = self.feature_term(student.features, teacher.features, targets) / max(rows["feature"], 1)
            weighted["feature"] = parts["feature"]
        if weighted:
            rest = sum(weights[name] * value for name, value in weighted.items())
            loss = rest if loss is None else loss + rest
        if loss is None:
            logits = student.logits
            loss = logits.anchor() if isinstance(logits, HiddenStates) else logits.sum() * 0.0
        return loss, parts

    def check_outputs(self, student_logits: torch.Tensor | HiddenStates) -> None:
        """The task made what this stage's implementation needs: hidden states for ``fused``, logits otherwise."""
        if isinstance(student_logits, HiddenStates) != (self.loss_impl == "fused"):
            given = "hidden states" if isinstance(student_logits, HiddenStates) else "logits"
            raise ValueError(f"loss_impl {self.loss_impl!r} was given {given}; the task and the objective disagree")

    def plain_terms(
        self, weights: dict[str, float], student: Outputs, teacher: Outputs | None, targets: Targets, rows
    ) -> dict[str, torch.Tensor]:
        """KD and CE by the plain functions of losses/logits.py (and losses/sparse.py), normalised."""
        parts = {}
        if "kd" in weights:
            mask = targets.kd_rows(self.per_token)
            signal = teacher.logits
            if isinstance(signal, LazyTeacher):  # hidden states, several teachers mixed: all rows at once
                signal = signal.logits_at()
            total = kd_divergence(
                student.logits,
                signal,
                divergence=self.divergence,
                temperature=self.temperature,
                mask=mask,
                beta=self.jsd_beta,
            )
            parts["kd"] = total / max(rows["kd"], 1)
        if "ce" in weights:
            total = cross_entropy_sum(student.logits, targets.labels, ignore_index=IGNORE_INDEX)
            parts["ce"] = total / max(rows["ce"], 1)
        return parts

    def aligned_terms(
        self, weights: dict[str, float], student: Outputs, teacher: Outputs | None, targets: Targets, rows
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KD across tokenizers (a sum over the batch's groups / the step's groups) and CE on the
        student's own tokens; parts ``kd`` and, for the hybrid, ``kd_matched`` / ``kd_unmatched``."""
        if self.aligned is None:
            raise ValueError("the batch is aligned across tokenizers but the objective has no cross-tokenizer loss")
        logits = student.logits  # (B, T_s - 1, V_s): a cross-tokenizer task gives logits
        loss = logits.sum() * 0.0
        parts: dict[str, torch.Tensor] = {}
        if "kd" in weights:
            scale = 1.0 / max(rows["kd"], 1)
            out = self.aligned(
                logits,
                teacher.logits,
                targets.alignment,
                temperature=self.temperature,
                divergence=self.divergence,
                beta=self.jsd_beta,
            )
            loss = loss + weights["kd"] * scale * out.loss
            parts["kd"] = out.loss.detach() * scale
            if out.matched is not None:
                parts["kd_matched"], parts["kd_unmatched"] = out.matched * scale, out.unmatched * scale
        if "ce" in weights:
            scale = 1.0 / max(rows["ce"], 1)
            if self.loss_impl == "chunked":
                ce = chunked_kd_ce(
                    logits, None, targets.labels, kd_weight=None, ce_weight=scale, chunk_rows=self.chunk_rows
                )
                loss, parts["ce"] = loss + weights["ce"] * ce.loss, ce.ce * scale
            else:
                total = cross_entropy_sum(logits, targets.labels, ignore_index=IGNORE_INDEX)
                loss, parts["ce"] = loss + weights["ce"] * scale * total, total.detach() * scale
        return loss, parts

    def large_vocab_terms(
        self, impl: str, weights: dict[str, float], student: Outputs, teacher: Outputs | None, targets: Targets, rows
    ) -> LossParts:
        """KD and CE in one chunked or fused pass; coefficients are weight / rows of the optimizer step."""
        kd_on = "kd" in weights
        signal = teacher.logits if kd_on else None
        options = dict(
            mask=targets.kd_rows(self.per_token),
            divergence=self.divergence,
            temperature=self.temperature,
            beta=self.jsd_beta,
            kd_weight=weights["kd"] / max(rows["kd"], 1) if kd_on else None,
            ce_weight=weights["ce"] / max(rows["ce"], 1) if "ce" in weights else None,
            chunk_rows=self.chunk_rows,
        )
        if impl == "fused":
            return fused_kd_ce(student.logits, signal, targets.labels, **options)
        return chunked_kd_ce(student.logits, signal, targets.labels, **options)

    def feature_term(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], targets: Targets
    ) -> torch.Tensor:
        """Weighted sum over layer pairs of the feature loss (a sum over rows)."""
        fn = FEATURE_LOSSES[self.feature_loss]
        mask = None
        if self.per_token:
            mask = targets.feature_mask if targets.feature_mask is not None else targets.kd_mask
        total = torch.zeros((), device=targets.labels.device)
        pairs = zip(self.heads, self.layer_weights, student_features, teacher_features)
        aligned = targets.alignment
        for head, weight, student_feature, teacher_feature in pairs:
            if aligned is not None:
                # Across tokenizers positions differ: compare the hidden states at each group's last token,
                # where both models have read the same text. (B, T, H) -> (G, H) on each side.
                student_feature = student_feature[aligned.batch, aligned.student.last]
                teacher_feature = teacher_feature[aligned.batch, aligned.teacher.last]
            total = total + weight * fn(
                head(student_feature),
                teacher_feature.detach(),
                per_token=self.per_token and aligned is None,
                mask=mask if aligned is None else None,
            )
        return total
