"""Projection heads that map a student feature onto the teacher feature's shape.

Real students are narrower than their teachers, so the article's plain MSE between features
cannot run. A head is chosen from the observed per-sample shapes (batch dim excluded):

- equal shapes -> identity (nothing to learn);
- vectors ``(d_s,)`` -> ``(d_t,)``, or tokens ``(T, d_s)`` -> ``(T, d_t)`` -> ``Linear(d_s, d_t)``;
- conv maps ``(C_s, *S)`` -> ``(C_t, *S)`` with equal spatial size -> 1x1 convolution;
- a vector student onto a conv map teacher -> ``Linear(d_s, prod(teacher))`` reshaped;
- a conv map student onto a vector teacher -> flatten, then ``Linear``.

Anything else (conv maps of different spatial sizes) raises a UserError naming both shapes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import nn

from distilflow.errors import UserError

if TYPE_CHECKING:
    from distilflow.models.layers import LayerPair


def build_head(
    student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, per_token: bool, name: str
) -> nn.Module:
    """A head for one layer pair; ``name`` ('student.path -> teacher.path') goes into errors."""
    student, teacher = tuple(student_shape), tuple(teacher_shape)
    if student == teacher:
        return nn.Identity()
    if per_token:
        if len(student) != 2 or len(teacher) != 2 or student[0] != teacher[0]:
            raise UserError(
                f"feature pair {name}: student shape {student} and teacher shape {teacher} per sample; token features "
                "must both be (seq_len, width) with the same seq_len"
            )
        return nn.Linear(student[-1], teacher[-1])
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) >= 2 and len(teacher) >= 2 and student[1:] == teacher[1:] and len(student) in (2, 3):
        conv = nn.Conv1d if len(student) == 2 else nn.Conv2d
        return conv(student[0], teacher[0], kernel_size=1)
    if len(student) == 1:
        return nn.Sequential(nn.Linear(student[0], math.prod(teacher)), nn.Unflatten(1, teacher))
    if len(teacher) == 1:
        return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(student), teacher[0]))
    raise UserError(
        f"feature pair {name}: no projection head maps student shape {student} onto teacher shape {teacher}; allowed: "
        "vectors, or conv maps with the same spatial size, or a vector on either side"
    )


def build_heads(
    pairs: list[LayerPair],
    student_shapes: list[tuple[int, ...]],
    teacher_shapes: list[tuple[int, ...]],
    *,
    per_token: bool,
) -> nn.ModuleList:
    """One head per layer pair, from the per-sample shapes of its student and teacher features (the
    teacher's seen on a live teacher or read from a cache: the same heads either way)."""
    heads = nn.ModuleList()
    for pair, student_shape, teacher_shape in zip(pairs, student_shapes, teacher_shapes):
        name = f"student '{pair.student}' -> teacher '{pair.teacher}'"
        heads.append(build_head(student_shape, teacher_shape, per_token=per_token, name=name))
    return heads
