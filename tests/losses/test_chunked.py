"""Chunked KD + CE against the plain losses of losses/logits.py: same values and gradients.

Tolerances: the chunked loss runs the very same float32 functions on slices of rows; the only
difference is the order in which the per-row values are summed (per chunk, then over chunks),
which moves a float32 sum of a few dozen positive terms by a few ulps. rel 1e-5 (the issue's
bar) with an absolute floor of 1e-6 of the largest gradient entry (entries that cancel to ~0)
covers that on any CPU kernel (AVX-512 or the default scalar path).
"""

from __future__ import annotations

import pytest
import torch

from distilflow.config import KDWeightConfig, load_config
from distilflow.errors import UserError
from distilflow.losses.chunked import chunk_rows_for, chunked_kd_ce
from distilflow.losses.logits import DIVERGENCES, cross_entropy_sum
from distilflow.losses.objective import (
    AUTO_FUSED_LOGITS,
    AUTO_LARGE_LOGITS,
    Objective,
    Outputs,
    Targets,
    choose_loss_impl,
)
from distilflow.schedules import Phase

from .conftest import DIVERGENCE_NAMES, V, assert_close, make_inputs, plain_total


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 3, 0, 100])
def test_chunked_equals_plain_value_and_gradient(divergence, temperature, masked, chunk_rows):
    student, teacher, labels, mask = make_inputs(1)
    mask = mask if masked else None
    options = dict(divergence=divergence, temperature=temperature, beta=0.3, kd_weight=0.7, ce_weight=0.2)

    ref_leaf = student.clone().requires_grad_()
    ref_total, ref_kd, ref_ce = plain_total(ref_leaf, teacher, labels, mask, **options)
    (ref_grad,) = torch.autograd.grad(ref_total, ref_leaf)

    leaf = student.clone().requires_grad_()
    out = chunked_kd_ce(leaf, teacher, labels, mask=mask, chunk_rows=chunk_rows, **options)
    (grad,) = torch.autograd.grad(out.loss, leaf)

    assert_close(out.loss, ref_total.detach(), "loss")
    assert_close(out.kd, ref_kd.detach(), "kd")
    assert_close(out.ce, ref_ce.detach(), "ce")
    assert_close(grad, ref_grad, "gradient")
    assert not out.kd.requires_grad and not out.ce.requires_grad  # logged values; the loss carries the gradient


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_vocab_cut_minus_infinity_and_non_contiguous_rows(divergence):
    """The shared-vocabulary cut of a wider student and teacher; -inf logits (a masked vocabulary
    entry); shifted logits ``[:, :-1]`` (a view with row gaps, as the causal-LM task gives)."""
    student, teacher, labels, mask = make_inputs(2, v=V + 6)
    teacher = teacher[..., : V + 2]  # the teacher's table is smaller than the student's
    labels = torch.where(labels == -100, labels, labels % V)  # hard labels are shared ids
    student[:, :, 5] = -float("inf")
    teacher[:, :, 5] = -float("inf")
    t_shifted, l_shifted, m_shifted = teacher[:, :-1], labels[:, 1:], mask[:, 1:]
    options = dict(divergence=divergence, temperature=2.0, beta=0.5, kd_weight=1.0, ce_weight=0.5)

    ref_leaf = student.clone().requires_grad_()
    ref_total, _, _ = plain_total(
        ref_leaf[:, :-1, :V], t_shifted[..., :V], l_shifted, m_shifted, **options
    )  # the cut done by hand
    (ref_grad,) = torch.autograd.grad(ref_total, ref_leaf)

    leaf = student.clone().requires_grad_()
    out = chunked_kd_ce(leaf[:, :-1], t_shifted, l_shifted, mask=m_shifted, chunk_rows=4, vocab_size=V, **options)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert torch.isfinite(out.loss)
    assert_close(out.loss, ref_total.detach())
    assert_close(grad, ref_grad)
    assert torch.all(grad[:, :, V:] == 0) and torch.all(grad[:, -1] == 0)  # cut columns, the unscored last position


def test_single_terms_classifier_rows_and_no_grad():
    student, teacher, labels, _ = make_inputs(3, b=10, t=1)
    student, teacher, labels = student[:, 0], teacher[:, 0], labels[:, 0]  # (B, C) like a classifier
    labels[4] = -100  # an unlabeled transfer sample
    kd_only = chunked_kd_ce(student, teacher, None, temperature=3.0, kd_weight=1.0, ce_weight=None, chunk_rows=4)
    assert kd_only.ce is None
    assert_close(kd_only.loss, DIVERGENCES["forward_kl"](student, teacher, temperature=3.0))
    ce_only = chunked_kd_ce(student, None, labels, kd_weight=None, ce_weight=1.0, chunk_rows=3)
    assert ce_only.kd is None
    assert_close(ce_only.loss, cross_entropy_sum(student, labels))
    with torch.no_grad():  # evaluation: no gradient is made or kept
        both = chunked_kd_ce(student.requires_grad_(), teacher, labels, temperature=3.0, ce_weight=1.0)
    assert not both.loss.requires_grad
    assert_close(both.loss, kd_only.loss.detach() + ce_only.loss.detach())


def test_bfloat16_logits_give_the_plain_value_and_a_bfloat16_gradient():
    """The loss math is float32 on both paths; the gradient is the float32 one rounded to bfloat16
    (one rounding: relative error <= 2^-9; the plain path rounds its KD and CE gradients apart)."""
    student, teacher, labels, mask = make_inputs(4)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    options = dict(divergence="forward_kl", temperature=2.0, beta=0.5, kd_weight=1.0, ce_weight=1.0)
    ref_leaf = student.float().requires_grad_()  # the same values, kept in float32
    ref_total, _, _ = plain_total(ref_leaf, teacher, labels, mask, **options)
    (ref_grad,) = torch.autograd.grad(ref_total, ref_leaf)
    leaf = student.clone().requires_grad_()
    out = chunked_kd_ce(leaf, teacher, labels, mask=mask, chunk_rows=5, **options)
    (grad,) = torch.autograd.grad(out.loss, leaf)
    assert grad.dtype == torch.bfloat16
    assert_close(out.loss, ref_total.detach())
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2**-8, atol=2**-8 * float(ref_grad.abs().max()))


def test_auto_rule_and_chunk_size():
    # Causal LMs: fused from 2^20 logit entries per micro-batch (the LM demo has 16 x 127 x 2048 = 4.2M).
    assert choose_loss_impl("auto", rows=16 * 127, vocab_size=2048, hidden_states=True) == "fused"
    assert choose_loss_impl("auto", rows=8 * 31, vocab_size=300, hidden_states=True) == "plain"  # tests' tiny LM
    assert choose_loss_impl("auto", rows=AUTO_FUSED_LOGITS, vocab_size=1, hidden_states=True) == "fused"
    assert choose_loss_impl("auto", rows=AUTO_FUSED_LOGITS - 1, vocab_size=1, hidden_states=True) == "plain"
    assert choose_loss_impl("auto", rows=4 * 511, vocab_size=151936, hidden_states=True) == "fused"
    # Classifiers: chunked from 2^25.
    assert choose_loss_impl("auto", rows=4 * 511, vocab_size=151936, hidden_states=False) == "chunked"
    assert choose_loss_impl("auto", rows=AUTO_LARGE_LOGITS, vocab_size=1, hidden_states=False) == "chunked"
    assert choose_loss_impl("auto", rows=AUTO_LARGE_LOGITS - 1, vocab_size=1, hidden_states=False) == "plain"
    assert choose_loss_impl("fused", rows=1, vocab_size=10, hidden_states=False) == "chunked"
    assert choose_loss_impl("plain", rows=10**9, vocab_size=10**6, hidden_states=True) == "plain"
    with pytest.raises(ValueError, match="loss_impl"):
        choose_loss_impl("fast", rows=1, vocab_size=1, hidden_states=True)
    assert chunk_rows_for(131072) == 64 and chunk_rows_for(41) == (1 << 23) // 41 and chunk_rows_for(10**8) == 8
    assert chunk_rows_for(131072, 100) == 100


@pytest.mark.parametrize("terms", [("kd", "ce"), ("kd",), ("ce",)])
def test_objective_chunked_equals_plain(terms):
    """The objective's loss, logged parts and gradient are those of the plain objective."""
    student, teacher, labels, mask = make_inputs(5)
    rows = {"kd": int(mask.sum()) + 3, "ce": int(mask.sum()) + 5, "feature": 1}  # rows of a larger step
    results = []
    for impl in ("plain", "chunked"):
        objective = Objective(
            [Phase("joint", 0, 10, terms)],
            total_steps=10,
            kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
            temperature=2.0,
            ce_weight=0.3,
            per_token=True,
        )
        objective.loss_impl, objective.chunk_rows = impl, 4
        leaf = student.clone().requires_grad_()
        loss, parts = objective(0, Outputs(leaf), Outputs(teacher), Targets(labels, mask), rows)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), {k: v.detach() for k, v in parts.items()}, grad))
    (plain_loss, plain_parts, plain_grad), (loss, parts, grad) = results
    assert set(parts) == set(terms) == set(plain_parts)
    assert_close(loss, plain_loss)
    for name in terms:
        assert_close(parts[name], plain_parts[name], name)
    assert_close(grad, plain_grad)


def test_config_keys_select_and_check_the_implementation():
    cfg = load_config(None, ["distill.loss_impl=chunked", "distill.loss_chunk_rows=128"])
    assert (cfg.distill.loss_impl, cfg.distill.loss_chunk_rows) == ("chunked", 128)
    with pytest.raises(UserError, match="'distill.loss_impl': 'fused' is not allowed; fused makes the logits"):
        load_config(None, ["distill.loss_impl=fused"])  # the default config is a classifier: no lm_head
    assert load_config().distill.loss_impl == "auto"
    with pytest.raises(UserError, match="loss_impl"):
        load_config(None, ["distill.loss_impl=fast"])
    with pytest.raises(UserError, match="distill.loss_chunk_rows"):
        load_config(None, ["distill.loss_chunk_rows=-1"])
