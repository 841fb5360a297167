"""Feature-alignment losses between (projected) student features and teacher features.

The article's ``FeatureAlignmentLoss`` L2-normalises both features and takes a weighted MSE per
layer pair. We keep that, with two corrections (docs/ARTICLE.md): the student feature first goes
through a learned projection head when widths differ (models/heads.py), and the squared distance
is summed over the feature dimension and averaged over rows, so the loss does not shrink as
1/width the way an element-wise mean does. For unit vectors ``||a - b||^2 = 2 - 2 cos(a, b)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distilflow.losses.logits import at_least_float32


def _as_rows(feature: torch.Tensor, per_token: bool) -> torch.Tensor:
    """``(B, ...)`` -> rows ``(N, D)``: one row per sample, or per token for ``(B, T, D)``."""
    if per_token:
        return feature.reshape(-1, feature.shape[-1])
    return feature.reshape(feature.shape[0], -1)


def normalized_mse(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    *,
    per_token: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of ``|| student/|student| - teacher/|teacher| ||^2``.

    Shapes: both features ``(B, ...)`` of equal shape; a row is a sample (all non-batch dims
    flattened) or, with ``per_token``, a position of a ``(B, T, D)`` sequence, selected by
    ``mask`` ``(B, T)``. Returns a scalar (sum over rows; divide by the row count).
    """
    student_rows = F.normalize(_as_rows(at_least_float32(student_feature), per_token), p=2, dim=-1)  # (N, D)
    teacher_rows = F.normalize(_as_rows(at_least_float32(teacher_feature), per_token), p=2, dim=-1)
    per_row = (student_rows - teacher_rows).pow(2).sum(-1)  # (N,)
    if mask is not None:
        per_row = per_row * mask.reshape(-1).to(per_row.dtype)
    return per_row.sum()


def cosine_distance(
    student_feature: torch.Tensor,
    teacher_feature: torch.Tensor,
    *,
    per_token: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of ``1 - cos(student, teacher)``. Shapes as :func:`normalized_mse`."""
    student_rows = _as_rows(at_least_float32(student_feature), per_token)  # (N, D)
    teacher_rows = _as_rows(at_least_float32(teacher_feature), per_token)
    per_row = 1.0 - F.cosine_similarity(student_rows, teacher_rows, dim=-1, eps=1e-8)
    if mask is not None:
        per_row = per_row * mask.reshape(-1).to(per_row.dtype)
    return per_row.sum()


FEATURE_LOSSES = {"normalized_mse": normalized_mse, "cosine": cosine_distance}
