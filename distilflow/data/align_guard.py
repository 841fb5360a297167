"""The guard against a teacher fed the wrong ids: do the aligned spans of both sides spell the same text?

A teacher fed the student's token ids (instead of its own tokenizer's) is the most reported
cross-tokenizer distillation bug: nothing fails, the loss just distils noise. These checks decode
each group of a :class:`~distilflow.data.align.Alignment` with both tokenizers and compare the texts;
a Python loop over groups, meant for one batch (the first), not every step.
"""

from __future__ import annotations

from typing import Any

import torch

from distilflow.data.align import Alignment
from distilflow.errors import UserError


def _spelled(tokenizer: Any, ids: list[int]) -> str:
    """The text of ``ids`` without white space (tokenizers disagree on where spaces go)."""
    return "".join(tokenizer.decode(ids, clean_up_tokenization_spaces=False).split())


def span_agreement(
    alignment: Alignment,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    teacher_input_ids: torch.Tensor | None = None,
    max_groups: int = 256,
) -> float:
    """The fraction of groups whose student tokens and teacher tokens decode to the same text.

    ``teacher_input_ids`` ``(B, T)``: the ids the teacher is actually fed (default: the alignment's
    own). About 1.0 for a correct alignment (white space is ignored; groups with an unknown token
    or EOS do not count); near 0 for a teacher fed the student's ids. The first ``max_groups``
    text groups are decoded (a Python loop: a guard on a batch, not a per-step cost).
    """
    teacher_ids = alignment.teacher.input_ids if teacher_input_ids is None else teacher_input_ids
    student_ids = alignment.student.input_ids
    skip = {student_tokenizer.unk_token_id, student_tokenizer.eos_token_id} - {None}
    skip_teacher = {teacher_tokenizer.unk_token_id, teacher_tokenizer.eos_token_id} - {None}
    agree = counted = 0
    for g in range(alignment.num_groups):
        if counted >= max_groups:
            break
        b = int(alignment.batch[g])
        s_first, s_last = int(alignment.student.first[g]), int(alignment.student.last[g])
        t_first, t_last = int(alignment.teacher.first[g]), int(alignment.teacher.last[g])
        student_span = student_ids[b, s_first : s_last + 1].tolist()
        if skip.intersection(student_span):
            continue
        teacher_span = teacher_ids[b, t_first : t_last + 1].tolist() if t_last < teacher_ids.shape[1] else []
        if skip_teacher.intersection(alignment.teacher.input_ids[b, t_first : t_last + 1].tolist()):
            continue
        counted += 1
        agree += bool(teacher_span) and _spelled(student_tokenizer, student_span) == _spelled(
            teacher_tokenizer, teacher_span
        )
    return agree / counted if counted else 1.0


def check_teacher_ids(
    alignment: Alignment,
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    teacher_input_ids: torch.Tensor,
    *,
    min_agreement: float = 0.9,
    max_groups: int = 256,
) -> None:
    """A one-line :class:`UserError` unless the ids fed to the teacher spell the student's text
    (:func:`span_agreement` at least ``min_agreement``): the guard against a teacher fed the
    student's token ids, the most reported cross-tokenizer bug."""
    agreement = span_agreement(
        alignment, student_tokenizer, teacher_tokenizer, teacher_input_ids=teacher_input_ids, max_groups=max_groups
    )
    if agreement < min_agreement:
        raise UserError(
            f"the teacher's input ids do not spell the student's text ({agreement:.0%} of aligned spans agree, "
            f"{min_agreement:.0%} needed): the teacher must be fed its own tokenizer's ids"
        )
