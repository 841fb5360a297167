"""Divergences on logits against plain float64 references written with numpy and loops."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch

from distilflow.config import DistillConfig
from distilflow.losses.logits import DIVERGENCES as REGISTRY
from distilflow.losses.logits import cross_entropy_sum, forward_kl, generalized_jsd, reverse_kl

# ---------------------------------------------------------------- independent references


def ref_softmax(row: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(row, dtype=np.float64) / temperature
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) for one row, 0 * log 0 = 0."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * math.log(pi / qi)
    return total


def rows_of(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy().reshape(-1, x.shape[-1])


def mask_rows(mask: torch.Tensor | None, n: int) -> list[bool]:
    return [True] * n if mask is None else [bool(m) for m in mask.reshape(-1)]


def ref_forward_kl(student, teacher, temperature=1.0, mask=None) -> float:
    s, t = rows_of(student), rows_of(teacher)
    keep = mask_rows(mask, len(s))
    total = sum(
        ref_kl(ref_softmax(t[i], temperature), ref_softmax(s[i], temperature)) for i in range(len(s)) if keep[i]
    )
    return temperature**2 * total


def ref_reverse_kl(student, teacher, temperature=1.0, mask=None) -> float:
    """KL(student || teacher): the forward reference with the roles swapped."""
    return ref_forward_kl(teacher, student, temperature, mask)


def ref_jsd(student, teacher, beta=0.5, temperature=1.0, mask=None) -> float:
    s, t = rows_of(student), rows_of(teacher)
    keep = mask_rows(mask, len(s))
    total = 0.0
    for i in range(len(s)):
        if not keep[i]:
            continue
        p_teacher, p_student = ref_softmax(t[i], temperature), ref_softmax(s[i], temperature)
        m = beta * p_teacher + (1 - beta) * p_student
        total += beta * ref_kl(p_teacher, m) + (1 - beta) * ref_kl(p_student, m)
    return temperature**2 * total


def ref_cross_entropy_sum(student, labels, ignore_index=-100) -> float:
    s = rows_of(student)
    y = labels.reshape(-1).tolist()
    total = 0.0
    for row, label in zip(s, y):
        if label == ignore_index:
            continue
        total += -math.log(ref_softmax(row)[label])
    return total


def logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- values


DIVERGENCES = [
    (forward_kl, ref_forward_kl, {}),
    (reverse_kl, ref_reverse_kl, {}),
    (generalized_jsd, ref_jsd, {"beta": 0.5}),
    (generalized_jsd, ref_jsd, {"beta": 0.1}),
    (generalized_jsd, ref_jsd, {"beta": 0.9}),
]
IDS = ["forward_kl", "reverse_kl", "jsd0.5", "jsd0.1", "jsd0.9"]


@pytest.mark.parametrize("fn, ref, extra", DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_divergence_2d_matches_reference(fn, ref, extra, temperature):
    student, teacher = logits(5, 7, seed=1), logits(5, 7, seed=2)
    got = fn(student, teacher, temperature=temperature, **extra)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref(student, teacher, temperature=temperature, **extra), rel=1e-10)


@pytest.mark.parametrize("fn, ref, extra", DIVERGENCES, ids=IDS)
def test_divergence_3d_with_mask_matches_reference(fn, ref, extra):
    student, teacher = logits(3, 4, 6, seed=3), logits(3, 4, 6, seed=4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    got = fn(student, teacher, temperature=2.0, mask=mask, **extra)
    want = ref(student, teacher, temperature=2.0, mask=mask, **extra)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # The unmasked sum is larger: the mask really drops rows.
    assert fn(student, teacher, temperature=2.0, **extra).item() > got.item() + 1e-6


@pytest.mark.parametrize("fn, _ref, extra", DIVERGENCES, ids=IDS)
def test_masked_rows_do_not_matter(fn, _ref, extra):
    student, teacher = logits(2, 5, 4, seed=5), logits(2, 5, 4, seed=6)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    before = fn(student, teacher, temperature=3.0, mask=mask, **extra)
    changed_student, changed_teacher = student.clone(), teacher.clone()
    changed_student[~mask] = 100.0 * logits(int((~mask).sum()), 4, seed=7)
    changed_teacher[~mask] = -50.0
    after = fn(changed_student, changed_teacher, temperature=3.0, mask=mask, **extra)
    assert after.item() == pytest.approx(before.item(), rel=1e-12)
    # and their gradient is zero
    x = student.clone().requires_grad_(True)
    fn(x, teacher, temperature=3.0, mask=mask, **extra).backward()
    assert torch.all(x.grad[~mask] == 0)
    assert torch.all(x.grad[mask].abs().sum(-1) > 0)


def test_hand_computed_two_class_value():
    # p_teacher = (0.5, 0.5), p_student = softmax(ln 3, 0) = (0.75, 0.25):
    # KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.5 ln(4/3)
    student = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    assert forward_kl(student, teacher).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # reverse: 0.75 ln(1.5) + 0.25 ln(0.5)
    assert reverse_kl(student, teacher).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # at T = 2, softmax(ln3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); times T^2 = 4
    a = math.sqrt(3) / (math.sqrt(3) + 1)
    want = 4 * (0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a)))
    assert forward_kl(student, teacher, temperature=2.0).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_equal_logits_give_zero(fn):
    x = logits(4, 9, seed=8)
    assert fn(x, x.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)
    # shifting all logits of a row by a constant leaves the distribution unchanged
    assert fn(x + 5.0, x.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_dtypes(fn):
    student, teacher = logits(3, 5, seed=9), logits(3, 5, seed=10)
    assert fn(student, teacher).dtype == torch.float64  # float64 is not downcast
    assert fn(student.float(), teacher.float()).dtype == torch.float32
    half = fn(student.to(torch.bfloat16), teacher.to(torch.bfloat16), temperature=2.0)
    assert half.dtype == torch.float32  # computed in float32, not bfloat16
    want = fn(student.to(torch.bfloat16).double(), teacher.to(torch.bfloat16).double(), temperature=2.0)
    assert half.item() == pytest.approx(want.item(), rel=1e-5)


def test_minus_infinity_logits_mean_zero_probability():
    # A masked vocabulary entry (-inf) has probability 0 and contributes 0, not nan.
    student, teacher = logits(2, 5, seed=11), logits(2, 5, seed=12)
    teacher[0, 1] = -math.inf
    x = student.clone().requires_grad_(True)
    value = forward_kl(x, teacher, temperature=2.0)
    assert value.item() == pytest.approx(ref_forward_kl(student, teacher, temperature=2.0), rel=1e-10)
    value.backward()
    assert torch.isfinite(x.grad).all()
    # -inf on both sides (a vocabulary padded in both models): the entry does not exist.
    student[0, 1] = -math.inf
    kept = [0, 2, 3, 4]
    trimmed_s, trimmed_t = student[:1, kept], teacher[:1, kept]
    for fn, extra in [(forward_kl, {}), (reverse_kl, {}), (generalized_jsd, {"beta": 0.3})]:
        x = student.clone().requires_grad_(True)
        value = fn(x, teacher, temperature=2.0, mask=torch.tensor([True, False]), **extra)
        want = fn(trimmed_s, trimmed_t, temperature=2.0, **extra)
        assert value.item() == pytest.approx(want.item(), rel=1e-10), fn.__name__
        value.backward()
        assert torch.isfinite(x.grad).all(), fn.__name__
    # student -inf where the teacher has mass: forward KL is infinite, as it should be
    only_student = teacher.clone()
    only_student[0, 1] = 0.0
    assert forward_kl(student, only_student).item() == math.inf


# ---------------------------------------------------------------- cross-entropy


def test_cross_entropy_sum_2d_and_3d_with_ignore_index():
    student = logits(4, 6, seed=13)
    labels = torch.tensor([2, -100, 5, 0])
    assert cross_entropy_sum(student, labels).item() == pytest.approx(ref_cross_entropy_sum(student, labels))
    student3 = logits(2, 3, 6, seed=14)
    labels3 = torch.tensor([[1, -100, -100], [4, 4, 0]])
    got = cross_entropy_sum(student3, labels3)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_cross_entropy_sum(student3, labels3), rel=1e-12)
    custom = torch.tensor([[1, 7, 7], [4, 4, 0]])
    assert cross_entropy_sum(student3, custom, ignore_index=7).item() == pytest.approx(got.item(), rel=1e-12)
    assert cross_entropy_sum(student3, torch.full((2, 3), -100)).item() == 0.0


# ---------------------------------------------------------------- JSD properties


def test_jsd_symmetric_at_half():
    a, b = logits(4, 6, seed=15), logits(4, 6, seed=16)
    ab = generalized_jsd(a, b, beta=0.5, temperature=1.5).item()
    ba = generalized_jsd(b, a, beta=0.5, temperature=1.5).item()
    assert ab == pytest.approx(ba, rel=1e-12)
    # in general, swapping the roles swaps beta and 1 - beta
    assert generalized_jsd(a, b, beta=0.2).item() == pytest.approx(generalized_jsd(b, a, beta=0.8).item())
    assert generalized_jsd(a, b, beta=0.2).item() != pytest.approx(generalized_jsd(b, a, beta=0.2).item())


def test_jsd_bounds():
    a, b = logits(6, 5, seed=17), logits(6, 5, seed=18)
    value = generalized_jsd(a, b, beta=0.5).item()
    assert 0 < value < 6 * math.log(2)
    # nearly disjoint supports: each row approaches ln 2
    far_student = torch.tensor([[60.0, 0.0, 0.0]], dtype=torch.float64)
    far_teacher = torch.tensor([[0.0, 0.0, 60.0]], dtype=torch.float64)
    assert generalized_jsd(far_student, far_teacher, beta=0.5).item() == pytest.approx(math.log(2), rel=1e-9)


def test_jsd_limits_are_forward_and_reverse_kl():
    student, teacher = logits(3, 5, seed=19), logits(3, 5, seed=20)
    eps = 1e-5
    forward = forward_kl(student, teacher, temperature=2.0).item()
    reverse = reverse_kl(student, teacher, temperature=2.0).item()
    assert generalized_jsd(student, teacher, beta=eps, temperature=2.0).item() / eps == pytest.approx(forward, rel=1e-3)
    near_one = generalized_jsd(student, teacher, beta=1 - eps, temperature=2.0).item() / eps
    assert near_one == pytest.approx(reverse, rel=1e-3)
    assert forward != pytest.approx(reverse, rel=1e-2)  # the two limits really differ


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, 1.5])
def test_jsd_beta_out_of_range(beta):
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits(2, 3), logits(2, 3, seed=1), beta=beta)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "fn, extra",
    [(forward_kl, {}), (reverse_kl, {}), (generalized_jsd, {"beta": 0.5}), (generalized_jsd, {"beta": 0.2})],
    ids=["forward_kl", "reverse_kl", "jsd0.5", "jsd0.2"],
)
def test_gradcheck_divergences(fn, extra):
    student = logits(2, 3, 4, seed=21).requires_grad_(True)
    teacher = logits(2, 3, 4, seed=22).requires_grad_(True)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda s, t: fn(s, t, temperature=2.5, mask=mask, **extra), (student, teacher), eps=1e-6, atol=1e-6
    )


def test_gradcheck_cross_entropy_sum():
    student = logits(2, 3, 5, seed=23).requires_grad_(True)
    labels = torch.tensor([[0, -100, 4], [2, 2, -100]])
    assert torch.autograd.gradcheck(lambda s: cross_entropy_sum(s, labels), (student,), eps=1e-6, atol=1e-6)


def test_forward_kl_gradient_formula():
    # d/ds T^2 KL(p_t || p_s) = T (p_s - p_t) at temperature T (Hinton et al. 2015, eq. 1-2).
    student, teacher = logits(3, 4, seed=24), logits(3, 4, seed=25)
    x = student.clone().requires_grad_(True)
    forward_kl(x, teacher, temperature=3.0).backward()
    s, t = rows_of(student), rows_of(teacher)
    want = np.stack([3.0 * (ref_softmax(s[i], 3.0) - ref_softmax(t[i], 3.0)) for i in range(3)])
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- the T^2 factor


def _grad_norm(student, teacher, temperature, scale):
    x = student.clone().requires_grad_(True)
    (scale * forward_kl(x, teacher, temperature=temperature)).backward()
    return x.grad.norm().item()


def test_t_squared_keeps_gradient_size_independent_of_temperature():
    student, teacher = logits(8, 10, seed=26), logits(8, 10, seed=27)
    with_t2 = _grad_norm(student, teacher, 4.0, 1.0) / _grad_norm(student, teacher, 8.0, 1.0)
    assert 0.8 < with_t2 < 1.25
    # Without T^2 (divide it out) the gradient shrinks ~ 1/T^2: doubling T quarters it.
    without = _grad_norm(student, teacher, 4.0, 1 / 16) / _grad_norm(student, teacher, 8.0, 1 / 64)
    assert 3.2 < without < 5.0


def test_high_temperature_limit_is_logit_matching():
    # For large T the gradient tends to (s - mean s - t + mean t) / V (Hinton et al. 2015, eq. 4).
    student, teacher = logits(3, 6, seed=28, scale=0.5), logits(3, 6, seed=29, scale=0.5)
    x = student.clone().requires_grad_(True)
    forward_kl(x, teacher, temperature=2000.0).backward()
    s, t = rows_of(student), rows_of(teacher)
    want = ((s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))) / 6
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=0, atol=2e-4)


# ---------------------------------------------------------------- the article's KD term


def article_kd(student, teacher, temperature) -> float:
    """The article: KLDivLoss(batchmean)(log_softmax(student), softmax(teacher / T)): no T on the student, no T^2."""
    s, t = rows_of(student), rows_of(teacher)
    return sum(ref_kl(ref_softmax(t[i], temperature), ref_softmax(s[i])) for i in range(len(s))) / len(s)


def test_article_kl_differs_from_ours():
    student, teacher = logits(4, 5, seed=30), logits(4, 5, seed=31)
    # At T = 1 both are the same KL; ours is a sum over rows, the article's a batch mean.
    assert forward_kl(student, teacher).item() / 4 == pytest.approx(article_kd(student, teacher, 1.0), rel=1e-10)
    # At T = 4 they are different losses.
    ours = forward_kl(student, teacher, temperature=4.0).item() / 4
    assert abs(ours - article_kd(student, teacher, 4.0)) > 0.05
    # A student that matches the teacher exactly has zero loss in ours, not in the article's:
    # there the optimum is the *softened* teacher, student = teacher / T.
    assert forward_kl(teacher, teacher, temperature=4.0).item() == pytest.approx(0.0, abs=1e-12)
    assert article_kd(teacher, teacher, 4.0) > 0.05
    assert article_kd(teacher / 4.0, teacher, 4.0) == pytest.approx(0.0, abs=1e-12)


def test_registry_names_match_config():
    allowed = typing.get_args(typing.get_type_hints(DistillConfig)["divergence"])
    assert set(REGISTRY) == set(allowed)
    assert REGISTRY == {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}
