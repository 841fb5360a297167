"""A teacher of another tokenizer: the frozen teacher run on its own ids of each aligned row.

Batches of a cross-tokenizer run (data/aligned_rows.py) carry both sides' columns: the student reads
``input_ids``, the teacher ``teacher_input_ids``. Feeding the teacher the student's ids is the most
reported cross-tokenizer bug (nothing fails, the loss distils noise), so :class:`TeacherIdsGuard`
decodes the aligned spans of the first batch (and of the first on-policy batch) with both
tokenizers and refuses, in one line, ids that do not spell the student's text (data/align_guard.py). A live teacher runs
:class:`TeacherOwnIds` (teachers/live.py's ``LiveTeacher`` over it); the teacher-signal cache writes
with the same forward (:func:`teacher_logits`) and the same guard.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distilflow.data.align_guard import check_teacher_ids
from distilflow.data.aligned_rows import TEACHER_PREFIX, alignment_from_rows
from distilflow.tasks.causal_lm import lm_logits
from distilflow.teachers.base import Batch


class TeacherIdsGuard:
    """Checks that the ids about to be fed to the teacher spell the student's text: on the first batch
    of the fixed data and on the first batch of on-policy samples (re-tokenized text), once each."""

    def __init__(self, student_tokenizer: Any, teacher_tokenizer: Any) -> None:
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.checked: set[bool] = set()  # True: a batch of samples was checked; False: one of the data

    def __call__(self, batch: Batch, teacher_input_ids: torch.Tensor) -> None:
        kind = "sampled" in batch
        if kind in self.checked:
            return
        cpu = {key: value.cpu() for key, value in batch.items() if key != "sampled"}
        check_teacher_ids(
            alignment_from_rows(cpu), self.student_tokenizer, self.teacher_tokenizer, teacher_input_ids.cpu()
        )
        self.checked.add(kind)


def teacher_inputs(batch: Batch) -> Batch:
    """The teacher's ``input_ids`` / ``attention_mask`` ``(B, T_teacher)`` of an aligned batch."""
    return {key: batch[TEACHER_PREFIX + key] for key in ("input_ids", "attention_mask")}


def teacher_logits(model: nn.Module, batch: Batch, guard: TeacherIdsGuard | None = None) -> torch.Tensor:
    """Shifted teacher logits ``(B, T_teacher - 1, V_teacher)`` on the teacher's own ids of ``batch``."""
    inputs = teacher_inputs(batch)
    if guard is not None:
        guard(batch, inputs["input_ids"])
    return lm_logits(model, inputs)


class TeacherOwnIds:
    """The teacher's forward across tokenizers, for :class:`~distilflow.teachers.live.LiveTeacher`: shifted
    logits on the teacher's own ids of each aligned batch, the first batch guarded."""

    def __init__(self, guard: TeacherIdsGuard) -> None:
        self.guard = guard

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return teacher_logits(model, batch, self.guard)
