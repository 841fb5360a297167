"""Feature-alignment losses against plain numpy references."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch

from distilflow.config import DistillConfig
from distilflow.losses.features import FEATURE_LOSSES, cosine_distance, normalized_mse


def feats(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def ref_cos(a: np.ndarray, b: np.ndarray) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_rows(x: torch.Tensor, per_token: bool) -> np.ndarray:
    x = x.detach().numpy()
    return x.reshape(-1, x.shape[-1]) if per_token else x.reshape(x.shape[0], -1)


def ref_normalized_mse(student, teacher, per_token=False, mask=None) -> float:
    """Sum over rows of || s/|s| - t/|t| ||^2, written out."""
    s, t = ref_rows(student, per_token), ref_rows(teacher, per_token)
    keep = [True] * len(s) if mask is None else mask.reshape(-1).tolist()
    total = 0.0
    for a, b, k in zip(s, t, keep):
        if k:
            a, b = a / np.sqrt((a * a).sum()), b / np.sqrt((b * b).sum())
            total += float(((a - b) ** 2).sum())
    return total


def ref_cosine_distance(student, teacher, per_token=False, mask=None) -> float:
    s, t = ref_rows(student, per_token), ref_rows(teacher, per_token)
    keep = [True] * len(s) if mask is None else mask.reshape(-1).tolist()
    return sum(1.0 - ref_cos(a, b) for a, b, k in zip(s, t, keep) if k)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 5), (2, 3, 2, 2)])
def test_normalized_mse_is_two_minus_two_cos_per_row(shape):
    student, teacher = feats(*shape, seed=1), feats(*shape, seed=2)
    got = normalized_mse(student, teacher)
    assert got.dim() == 0 and got.dtype == torch.float64
    s, t = ref_rows(student, False), ref_rows(teacher, False)
    two_minus_two_cos = sum(2.0 - 2.0 * ref_cos(a, b) for a, b in zip(s, t))
    assert got.item() == pytest.approx(two_minus_two_cos, rel=1e-10)
    assert got.item() == pytest.approx(ref_normalized_mse(student, teacher), rel=1e-10)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 5)])
def test_cosine_distance(shape):
    student, teacher = feats(*shape, seed=3), feats(*shape, seed=4)
    got = cosine_distance(student, teacher)
    assert got.item() == pytest.approx(ref_cosine_distance(student, teacher), rel=1e-10)
    # for unit vectors the two losses differ by exactly a factor 2
    assert normalized_mse(student, teacher).item() == pytest.approx(2 * got.item(), rel=1e-10)


def test_hand_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    b = torch.tensor([[5.0, 0.0], [0.0, 2.0], [-3.0, -4.0]], dtype=torch.float64)
    # same direction: 0; orthogonal: 2; opposite: 4
    assert normalized_mse(a, b).item() == pytest.approx(6.0)
    assert cosine_distance(a, b).item() == pytest.approx(3.0)


def test_scale_invariance():
    student, teacher = feats(3, 8, seed=5), feats(3, 8, seed=6)
    base = normalized_mse(student, teacher).item()
    assert normalized_mse(7.5 * student, 0.01 * teacher).item() == pytest.approx(base, rel=1e-10)
    assert cosine_distance(7.5 * student, teacher).item() == pytest.approx(cosine_distance(student, teacher).item())


def test_per_token_with_mask():
    student, teacher = feats(2, 4, 3, seed=7), feats(2, 4, 3, seed=8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    for fn, ref in [(normalized_mse, ref_normalized_mse), (cosine_distance, ref_cosine_distance)]:
        got = fn(student, teacher, per_token=True, mask=mask)
        assert got.item() == pytest.approx(ref(student, teacher, per_token=True, mask=mask), rel=1e-10)
        # per token is not the same as per sample (all tokens flattened into one row)
        assert fn(student, teacher, per_token=True).item() != pytest.approx(fn(student, teacher).item(), rel=1e-3)
        # masked positions do not count, whatever they hold
        changed = student.clone()
        changed[~mask] = feats(int((~mask).sum()), 3, seed=9)
        assert fn(changed, teacher, per_token=True, mask=mask).item() == pytest.approx(got.item(), rel=1e-12)


def test_the_loss_does_not_shrink_with_width():
    # An element-wise mean would divide by the width; a sum over features per row does not.
    narrow = normalized_mse(feats(64, 4, seed=10), feats(64, 4, seed=11)).item() / 64
    wide = normalized_mse(feats(64, 400, seed=12), feats(64, 400, seed=13)).item() / 64
    assert 1.5 < narrow < 2.5 and 1.8 < wide < 2.2  # both near 2 - 2 E[cos] = 2


@pytest.mark.parametrize("fn", [normalized_mse, cosine_distance])
def test_gradcheck(fn):
    student = feats(3, 4, seed=14).requires_grad_(True)
    teacher = feats(3, 4, seed=15).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, t: fn(s, t), (student, teacher), eps=1e-6, atol=1e-6)
    student3 = feats(2, 3, 4, seed=16).requires_grad_(True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s: fn(s, teacher.detach()[:2, None, :].expand(2, 3, 4), per_token=True, mask=mask),
        (student3,),
        eps=1e-6,
        atol=1e-6,
    )


def test_dtypes():
    student, teacher = feats(2, 5, seed=17), feats(2, 5, seed=18)
    for fn in FEATURE_LOSSES.values():
        assert fn(student, teacher).dtype == torch.float64
        assert fn(student.to(torch.bfloat16), teacher.to(torch.bfloat16)).dtype == torch.float32


def test_registry_names_match_config():
    allowed = typing.get_args(typing.get_type_hints(DistillConfig)["feature_loss"])
    assert set(FEATURE_LOSSES) == set(allowed)
    assert FEATURE_LOSSES["normalized_mse"] is normalized_mse and FEATURE_LOSSES["cosine"] is cosine_distance
