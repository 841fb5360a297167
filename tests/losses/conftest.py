"""Helpers shared by the loss tests: random logits with masked positions, the plain reference, tolerances."""

from __future__ import annotations

import torch

from distilflow.losses.logits import DIVERGENCES, cross_entropy_sum

B, T, V = 3, 7, 41
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "jsd")


def make_inputs(seed: int = 0, *, b: int = B, t: int = T, v: int = V, scale: float = 3.0):
    """Student and teacher logits (b, t, v), labels with ignored positions, and the KD mask."""
    g = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(b, t, v, generator=g)
    teacher = scale * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[-1, -3:] = -100  # padding
    return student, teacher, labels, labels != -100


def plain_total(student, teacher, labels, mask, *, divergence, temperature, beta, kd_weight, ce_weight):
    """The reference: the plain functions of losses/logits.py, weighted."""
    total = 0.0
    kd = ce = None
    if kd_weight is not None:
        extra = {"beta": beta} if divergence == "jsd" else {}
        kd = DIVERGENCES[divergence](student, teacher, temperature=temperature, mask=mask, **extra)
        total = total + kd_weight * kd
    if ce_weight is not None:
        ce = cross_entropy_sum(student, labels)
        total = total + ce_weight * ce
    return total, kd, ce


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    atol = 1e-6 * float(expected.abs().max()) + 1e-12
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=what)
