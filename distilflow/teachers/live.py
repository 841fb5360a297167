"""A live teacher: the frozen teacher model run on every batch (the default ``TeacherSignals``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from distilflow.losses.objective import Outputs
from distilflow.models.taps import Taps
from distilflow.teachers.base import Batch

if TYPE_CHECKING:
    from distilflow.teachers.cross_tokenizer import TeacherOwnIds
    from distilflow.train.loop import Task


class LiveTeacher:
    """A frozen teacher run on each batch (eval mode, no grad), under the stage's autocast.

    ``task.forward`` runs it exactly as the student runs (logits, or hidden states for the fused
    loss; across tokenizers ``task`` is teachers/cross_tokenizer.py's ``TeacherOwnIds``: its own
    ids); ``taps`` capture its features of the layer pairs (None: no feature term).
    """

    autocast = True

    def __init__(self, model: nn.Module, task: Task | TeacherOwnIds, taps: Taps | None) -> None:
        self.model, self.task, self.taps = model.eval(), task, taps
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, batch: Batch, *, features: bool) -> Outputs:
        if features and self.taps is not None:
            with self.taps.capture():
                logits = self.task.forward(self.model, batch)
            return Outputs(logits, self.taps.features())
        return Outputs(self.task.forward(self.model, batch))
