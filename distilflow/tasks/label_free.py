"""A label-free student (``distill.label_free``): the task as it is, with every training label hidden.

The student learns from the teacher's signals alone: a classifier from its inputs (the labelled
training inputs with their labels dropped, the transfer set), a causal LM from raw text with KD
alone. The wrapper keeps the task's batches, forward pass, KD mask (a classifier's every sample, an
LM's every real token) and evaluation (held-out labels still score the student), and hands the
loss an all-``IGNORE_INDEX`` label tensor, so no term and no combination rule can read a label
(config checks refuse the ``ce`` term and the label rules with it; teachers/weighting.py and
losses/adaptive.py fall back to the entropy where a label is missing).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from distilflow.losses.objective import IGNORE_INDEX, Targets
from distilflow.train.loop import Task  # noqa: TC001 - the protocol it wraps

Batch = dict[str, torch.Tensor]


class LabelFreeTask:
    """``task`` (a :class:`~distilflow.train.loop.Task`) whose targets carry no label."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.per_token, self.primary_metric, self.unit = task.per_token, task.primary_metric, task.unit

    def micro_batches(self, step: int) -> list[Batch]:
        return self.task.micro_batches(step)

    def count(self, batch: Batch) -> int:
        return self.task.count(batch)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.task.forward(model, batch)

    def targets(self, batch: Batch) -> Targets:
        target = self.task.targets(batch)
        return dataclasses.replace(target, labels=torch.full_like(target.labels, IGNORE_INDEX))

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.task.evaluate(model)
