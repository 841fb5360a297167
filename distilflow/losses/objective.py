"""The objective: for the current phase, the active loss terms, their weights, and the total.

Phase -> terms -> weights -> total and parts. Each term is a *sum over rows* divided by the
number of real rows in the whole optimizer step (all micro-batches), so gradient accumulation
gives the same loss and gradient as one big batch (the article's ``batchmean`` on
``[batch, seq, vocab]`` divided by the batch size only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from distilflow.losses.features import FEATURE_LOSSES
from distilflow.losses.logits import DIVERGENCES, cross_entropy_sum
from distilflow.schedules import Phase, kd_weight, phase_at

IGNORE_INDEX = -100


@dataclass
class Outputs:
    """What a model produced for a batch.

    ``logits`` ``(B, C)`` for classifiers or ``(B, T, V)`` for language models; ``features`` the
    tapped intermediate outputs in the order of the configured layer pairs.
    """

    logits: torch.Tensor
    features: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Targets:
    """What the student is scored against in a micro-batch.

    ``labels`` ``(B,)`` or ``(B, T)`` with ``IGNORE_INDEX`` where there is no hard label (an
    unlabeled transfer sample, padding, a prompt token); ``kd_mask`` ``(B,)`` or ``(B, T)``, True
    where the teacher's distribution counts (every sample; every real, non-prompt token);
    ``feature_mask`` ``(B, T)`` for token features (hidden states of every real input position;
    their length is T, not the T - 1 of shifted logits), None to reuse ``kd_mask``.
    """

    labels: torch.Tensor
    kd_mask: torch.Tensor
    feature_mask: torch.Tensor | None = None

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
    student; they live here because the feature term is their only user.
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
    ) -> None:
        super().__init__()
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
        if "kd" in weights:
            fn = DIVERGENCES[self.divergence]
            extra = {"beta": self.jsd_beta} if self.divergence == "jsd" else {}
            mask = targets.kd_mask if self.per_token else None
            total = fn(student.logits, teacher.logits, temperature=self.temperature, mask=mask, **extra)
            parts["kd"] = total / max(rows["kd"], 1)
        if "ce" in weights:
            parts["ce"] = cross_entropy_sum(student.logits, targets.labels, ignore_index=IGNORE_INDEX) / max(
                rows["ce"], 1
            )
        if "feature" in weights:
            parts["feature"] = self.feature_term(student.features, teacher.features, targets) / max(rows["feature"], 1)
        loss = sum(weights[name] * value for name, value in parts.items())
        if not parts:
            loss = student.logits.sum() * 0.0
        return loss, parts

    def feature_term(
        self, student_features: list[torch.Tensor], teacher_features: list[torch.Tensor], targets: Targets
    ) -> torch.Tensor:
        """Weighted sum over layer pairs of the feature loss (a sum over rows)."""
        fn = FEATURE_LOSSES[self.feature_loss]
        mask = None
        if self.per_token:
            mask = targets.feature_mask if targets.feature_mask is not None else targets.kd_mask
        total = torch.zeros((), device=targets.labels.device)
        for head, weight, s_feat, t_feat in zip(self.heads, self.layer_weights, student_features, teacher_features):
            total = total + weight * fn(head(s_feat), t_feat.detach(), per_token=self.per_token, mask=mask)
        return total
