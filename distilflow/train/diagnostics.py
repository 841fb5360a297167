"""Diagnostics measured while a stage trains, from what the objective already has.

Per logged step (``metrics.jsonl``, TensorBoard, the report's plots), in phases that run the teacher:

- ``agreement``: the share of rows where the student's top-1 class (or next token) is the teacher's;
  for causal LMs per real token (the ``kd_mask``). Dense teacher logits, a fused loss's hidden states
  (their logits made a chunk of rows at a time, without gradient) and a cache's sparse ids (topk: the
  id of the largest log-probability; sampled: the id drawn most often) alike.
- ``feature_cos/<student path>-><teacher path>``: per feature layer pair, the mean cosine similarity
  between the projected student feature (its projection head applied) and the teacher feature: per
  sample (all non-batch dims flattened) or, for causal LMs, per real token.

Both are computed from the student's and the teacher's outputs of the step's micro-batches, on logged
steps only and under ``no_grad``: no extra forward pass of either model (the projection head, one
Linear or 1x1 convolution, runs once more on a logged step). docs/BENCHMARKS.md has the overhead.

Per step: **loss spikes**. A step whose objective, its unweighted terms summed (so that a KD-weight
ramp or the CE weight does not move it), exceeds ``factor`` x the median of the previous ``window``
steps of the same phase (the window starts afresh at a phase boundary, where the terms change; the
median is floored at ``LEVEL_FLOOR`` of the phase's starting level) is a spike. The detector holds
only that window of floats; its state travels in the checkpoint, so a resumed run finds the same spikes.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distilflow.losses.chunked import LazyTeacher
from distilflow.losses.fused import HiddenStates
from distilflow.losses.objective import Outputs, Targets
from distilflow.losses.sparse import SparseTeacher

SPIKE_FACTOR = 3.0
"""Default ``diagnostics.spike_factor`` (see docs/CONFIG.md and the measured healthy runs in docs/BENCHMARKS.md)."""
SPIKE_WINDOW = 50
"""Default ``diagnostics.spike_window``: steps of the running median."""
MIN_HISTORY = 5
"""Steps of a phase that must be seen before a step of it can be judged (a median of fewer is noise)."""
LEVEL_FLOOR = 0.05
"""The median a step is compared with is at least this share of the phase's starting level (the median of
its first MIN_HISTORY steps): near zero a loss swings by large factors between batches without meaning
anything (a CE of 0.003 triples when one batch holds a single harder sample); tests/train/test_diagnostics.py."""
ARGMAX_ENTRIES = 1 << 22
"""Hidden states: logits are made for this many (row x vocabulary) entries at a time (16 MiB in float32)."""


def top1_ids(signal: torch.Tensor | HiddenStates | SparseTeacher) -> torch.Tensor:
    """The top-1 id per row: ``(..., V)`` logits -> ``(...)``; hidden states chunk by chunk; sparse ids
    by their largest value (a topk log-probability, or a sampled id's weight)."""
    if isinstance(signal, SparseTeacher):
        best = signal.values.argmax(-1, keepdim=True)  # (..., 1)
        return signal.ids.gather(-1, best).squeeze(-1)
    if isinstance(signal, HiddenStates):
        weight, bias = signal.head()
        hidden = signal.hidden.reshape(-1, signal.hidden.shape[-1])  # (N, H)
        rows = max(ARGMAX_ENTRIES // max(weight.shape[0], 1), 1)
        with torch.no_grad():
            ids = [F.linear(hidden[i : i + rows], weight, bias).argmax(-1) for i in range(0, len(hidden), rows)]
        return torch.cat(ids).reshape(signal.hidden.shape[:-1]) if ids else hidden.new_zeros(0, dtype=torch.long)
    if isinstance(signal, LazyTeacher):  # several teachers mixed (teachers/combine.py): logged steps only
        with torch.no_grad():
            return signal.logits_at().argmax(-1)
    return signal.argmax(-1)


def top1_matches(
    student_logits: torch.Tensor | HiddenStates,
    teacher_logits: torch.Tensor | HiddenStates | SparseTeacher,
    mask: torch.Tensor,
) -> tuple[int, int]:
    """``(rows where the top-1 ids agree, rows counted)`` over the rows selected by ``mask`` ``(...)``."""
    same = top1_ids(student_logits) == top1_ids(teacher_logits)  # (...)
    mask = mask.to(torch.bool)
    return int((same & mask).sum()), int(mask.sum())


def feature_rows(feature: torch.Tensor, per_token: bool) -> torch.Tensor:
    """``(B, ...)`` -> rows ``(N, D)``: one per sample (all non-batch dims), or per token of ``(B, T, D)``."""
    return feature.reshape(-1, feature.shape[-1]) if per_token else feature.reshape(feature.shape[0], -1)


def cosine_sum(
    projected_student: torch.Tensor,
    teacher_feature: torch.Tensor,
    *,
    per_token: bool,
    mask: torch.Tensor | None = None,
) -> tuple[float, int]:
    """``(sum over rows of cos(student, teacher), rows)``; rows as :func:`feature_rows`, selected by
    ``mask`` ``(B, T)`` for tokens."""
    student_rows = feature_rows(projected_student.float(), per_token)  # (N, D)
    teacher_rows = feature_rows(teacher_feature.float(), per_token)
    cos = F.cosine_similarity(student_rows, teacher_rows, dim=-1, eps=1e-8)  # (N,)
    if mask is not None and per_token:
        keep = mask.reshape(-1).to(torch.bool)
        return float(cos[keep].sum()), int(keep.sum())
    return float(cos.sum()), int(cos.numel())


def pair_name(student_path: str, teacher_path: str) -> str:
    """How a feature layer pair is named in metrics: ``feature_cos/<student path>-><teacher path>``."""
    return f"feature_cos/{student_path}->{teacher_path}"


class SpikeDetector:
    """Steps whose value exceeds ``factor`` x the median of the previous ``window`` steps of its phase."""

    def __init__(self, *, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> None:
        self.factor, self.window = factor, window
        self.phase: str | None = None
        self.history: deque[float] = deque(maxlen=window)
        self.start_level: float | None = None

    def update(self, phase: str, value: float) -> float | None:
        """The (floored) median ``value`` is compared with when it is a spike, else None; ``value`` joins
        the window (a spike too: a lasting jump in level stops being a spike once it fills half the window)."""
        if phase != self.phase:
            self.phase, self.history, self.start_level = phase, deque(maxlen=self.window), None
        if not math.isfinite(value):  # a skipped non-finite step is not part of the level
            return None
        median = statistics.median(self.history) if len(self.history) >= MIN_HISTORY else None
        if median is not None and self.start_level is None:
            self.start_level = median
        self.history.append(value)
        if median is None:
            return None
        reference = max(median, LEVEL_FLOOR * self.start_level)
        return reference if reference > 0 and value > self.factor * reference else None

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "history": list(self.history), "start_level": self.start_level}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.start_level = state.get("phase"), state.get("start_level")
        self.history = deque(state.get("history", []), maxlen=self.window)


class StepWatch:
    """What the loop calls to measure the diagnostics of a stage (see the module docstring).

    ``begin(logged)`` at the start of each step; ``observe`` on each micro-batch (does nothing on a step
    that is not logged); ``sums()`` joins the logged values' all-reduce; ``row(totals)`` gives the
    metrics of the step; ``spike(phase, parts)`` judges every step.
    """

    def __init__(
        self,
        *,
        pair_names: list[str] | None = None,
        heads: nn.ModuleList | None = None,
        per_token: bool = False,
        spike_factor: float = SPIKE_FACTOR,
        spike_window: int = SPIKE_WINDOW,
    ) -> None:
        self.heads = heads if heads is not None else nn.ModuleList()
        self.pair_names = list(pair_names or [])
        self.per_token = per_token
        self.spikes = SpikeDetector(factor=spike_factor, window=spike_window)
        self.logged = False
        self.totals: dict[str, float] = {}

    def begin(self, logged: bool) -> None:
        self.logged, self.totals = logged, {}

    def add(self, key: str, value: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + value

    @torch.no_grad()
    def observe(self, student: Outputs, teacher: Outputs | None, targets: Targets) -> None:
        """Agreement and per-pair cosine of one micro-batch (on a logged step with teacher outputs)."""
        if not self.logged or teacher is None:
            return
        if targets.alignment is not None:
            # A teacher of another tokenizer: its positions and ids are not the student's, so neither a
            # top-1 match nor a per-position cosine means anything (docs/DIAGNOSIS.md).
            return
        hits, rows = top1_matches(student.logits, teacher.logits, targets.kd_mask)
        self.add("agree_hits", hits)
        self.add("agree_rows", rows)
        if not (student.features and teacher.features):
            return
        mask = targets.feature_mask if targets.feature_mask is not None else targets.kd_mask
        for i, (head, student_feature, teacher_feature) in enumerate(
            zip(self.heads, student.features, teacher.features)
        ):
            total, count = cosine_sum(head(student_feature), teacher_feature, per_token=self.per_token, mask=mask)
            self.add(f"cos_sum_{i}", total)
            self.add(f"cos_rows_{i}", count)

    def sums(self) -> dict[str, float]:
        """This rank's sums of the step, keyed for the loop's all-reduce (same keys on every rank: a rank
        whose micro-batches had no rows still sends zeros)."""
        if not self.logged or not self.totals:
            return {}
        keys = ["agree_hits", "agree_rows"]
        if any(k.startswith("cos_") for k in self.totals):
            keys += [f"cos_{what}_{i}" for i in range(len(self.heads)) for what in ("sum", "rows")]
        return {f"_diag_{k}": self.totals.get(k, 0.0) for k in keys}

    def row(self, totals: dict[str, float]) -> dict[str, float]:
        """The diagnostics of a logged step from the all-reduced sums (removed from ``totals``)."""
        summed = {k.removeprefix("_diag_"): totals.pop(k) for k in [k for k in totals if k.startswith("_diag_")]}
        out: dict[str, float] = {}
        if summed.get("agree_rows"):
            out["agreement"] = summed["agree_hits"] / summed["agree_rows"]
        for i, name in enumerate(self.pair_names):
            if summed.get(f"cos_rows_{i}"):
                out[name] = summed[f"cos_sum_{i}"] / summed[f"cos_rows_{i}"]
        return out

    def spike(self, phase: str, parts: dict[str, float], loss: float) -> tuple[float, float] | None:
        """``(value, running median)`` when this step's objective (its unweighted terms summed; the loss
        when there are none) is a spike, else None."""
        value = sum(parts.values()) if parts else loss
        median = self.spikes.update(phase, value)
        return None if median is None else (value, median)

    def state_dict(self) -> dict[str, Any]:
        return {"spikes": self.spikes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spikes.load_state_dict(state.get("spikes", {}))
