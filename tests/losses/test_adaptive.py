"""The input-adaptive KD weight (losses/adaptive.py): scores against numpy, mean 1 over the optimizer
step, the KD term as the r-weighted mean by hand, and exact gradient accumulation through the objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distilflow.config import KDWeightConfig
from distilflow.errors import UserError
from distilflow.losses.adaptive import (
    AdaptiveKD,
    kd_mask,
    log_scores,
    position_weights,
    step_totals,
    summary,
)
from distilflow.losses.chunked import chunked_kd_ce
from distilflow.losses.confidence import dense_confidence, signal_confidence
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.logits import forward_kl
from distilflow.losses.objective import IGNORE_INDEX, Objective, Outputs, Targets, add_counts
from distilflow.losses.sparse import kd_divergence
from distilflow.schedules import Phase
from distilflow.teachers.combine import combine_teachers
from distilflow.teachers.weighting import Combination


def seeded(seed: int, *shape: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def np_softmax(row, temperature=1.0):
    z = np.asarray(row, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def np_log_score(row, label, settings: AdaptiveKD):
    """One position's log r, from scratch."""
    p = np_softmax(row, settings.confidence_temperature)
    if settings.source == "correctness" and label != IGNORE_INDEX:
        score = -math.log(p[label])
    else:
        score = float(-(p * np.log(p)).sum())
    sign = -1.0 if settings.prefer == "confident" else 1.0
    return min(max(sign * score / settings.tau, -50.0), 50.0)


def lm_batch(seed=0, b=3, t=5, v=7):
    teacher = seeded(seed, b, t, v)
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed + 1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)[:b, :t]
    labels[~mask] = IGNORE_INDEX
    labels[0, :2] = IGNORE_INDEX  # a prompt: KD counts there, no label
    return teacher, labels, mask


@pytest.mark.parametrize("source", ["entropy", "correctness"])
@pytest.mark.parametrize("prefer", ["confident", "uncertain"])
@pytest.mark.parametrize("at", [1.0, 2.0])
def test_log_scores_match_numpy(source, prefer, at):
    teacher, labels, _ = lm_batch()
    settings = AdaptiveKD(source=source, prefer=prefer, tau=0.7, confidence_temperature=at)
    got = log_scores(dense_confidence(teacher, labels=labels, temperature=at), settings)
    want = [
        np_log_score(row, label, settings)
        for row, label in zip(teacher.reshape(-1, 7).numpy(), labels.reshape(-1).tolist())
    ]
    np.testing.assert_allclose(got.reshape(-1).numpy(), want, rtol=1e-10, atol=1e-12)


def test_exponent_is_clipped():
    teacher = torch.tensor([[0.0, -200.0]], dtype=torch.float64)  # label 1 has NLL 200
    settings = AdaptiveKD(source="correctness", tau=1.0)
    got = log_scores(dense_confidence(teacher, labels=torch.tensor([1])), settings)
    assert float(got) == -50.0


def micro_split(bounds, *tensors):
    return [[t[a:b] for t in tensors] for a, b in bounds]


def test_weights_have_mean_one_over_the_real_positions_of_the_step():
    teacher, labels, mask = lm_batch()
    settings = AdaptiveKD(source="correctness", tau=0.5)
    parts = micro_split([(0, 1), (1, 3)], teacher, labels, mask)
    scores = [log_scores(dense_confidence(t, labels=y), settings) for t, y, _ in parts]
    total, count = step_totals(scores, [m for _, _, m in parts])
    assert count == int(mask.sum())
    weights = [position_weights(s, m, total=total, count=count) for s, (_, _, m) in zip(scores, parts)]
    real = torch.cat([w[m] for w, (_, _, m) in zip(weights, parts)])
    assert float(real.mean()) == pytest.approx(1.0, rel=1e-6)
    assert float(real.std()) > 0.1  # really adaptive
    assert all(float(w[~m].abs().sum()) == 0.0 for w, (_, _, m) in zip(weights, parts))
    # A single micro-batch's weights are not mean 1 by themselves: the step's total matters.
    assert float(weights[0][parts[0][2]].mean()) != pytest.approx(1.0, rel=1e-3)


def test_kd_term_is_the_r_weighted_mean_of_the_divergence_by_hand():
    """sum_pos a * D / n == sum_pos r * D / sum_pos r over the real positions, from numpy KLs."""
    temperature = 2.0
    teacher, labels, mask = lm_batch()
    student = seeded(9, *teacher.shape)
    settings = AdaptiveKD(source="entropy", prefer="uncertain", tau=2.0)
    score = log_scores(dense_confidence(teacher, labels=labels), settings)
    total, count = step_totals([score], [mask])
    weights = position_weights(score, mask, total=total, count=count).double()
    got = forward_kl(student, teacher, temperature=temperature, mask=kd_mask(weights, mask)) / count
    num = den = 0.0
    for s_row, t_row, m, lr in zip(
        student.reshape(-1, 7).numpy(), teacher.reshape(-1, 7).numpy(), mask.reshape(-1).tolist(), score.reshape(-1)
    ):
        if not m:
            continue
        p, q = np_softmax(t_row, temperature), np_softmax(s_row, temperature)
        kl = temperature**2 * float((p * np.log(p / q)).sum())
        num += math.exp(float(lr)) * kl
        den += math.exp(float(lr))
    assert float(got) == pytest.approx(num / den, rel=1e-6)  # weights are float32


def test_large_tau_gives_the_plain_schedule():
    teacher, labels, mask = lm_batch()
    score = log_scores(dense_confidence(teacher, labels=labels), AdaptiveKD(source="correctness", tau=1e9))
    total, count = step_totals([score], [mask])
    weights = position_weights(score, mask, total=total, count=count)
    torch.testing.assert_close(weights[mask], torch.ones(count), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- gradient accumulation


class TinyLM(torch.nn.Module):
    """x (B, T, 4) -> logits (B, T, 7)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 7).double()

    def forward(self, x):
        return self.lin(x)


def adaptive_step(student, obj, x, teacher, labels, mask, bounds, settings):
    """One optimizer step over micro-batches ``bounds``: the adaptive weights normalised over the whole
    step, the KD row count the boolean count (as phase B wires it). Returns loss and gradients."""
    student.zero_grad()
    parts = micro_split(bounds, x, teacher, labels, mask)
    scores = [log_scores(dense_confidence(t, labels=y), settings) for _, t, y, _ in parts]
    total, count = step_totals(scores, [m for *_, m in parts])
    rows: dict[str, int] = {}
    for _, _, y, m in parts:
        rows = add_counts(rows, Targets(labels=y, kd_mask=m).counts(per_token=True))
    loss_sum = 0.0
    for (xb, tb, yb, mb), score in zip(parts, scores):
        weights = position_weights(score, mb, total=total, count=count).double()
        targets = Targets(labels=yb, kd_mask=kd_mask(weights, mb))
        loss, _ = obj(0, Outputs(student(xb)), Outputs(tb), targets, rows)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("bounds", [[(0, 1), (1, 3)], [(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]])
def test_grad_accumulation_equals_one_batch(bounds):
    teacher, labels, mask = lm_batch()
    x = seeded(5, 3, 5, 4)
    obj = Objective(
        [Phase("kd+ce", 0, 10, ("kd", "ce"))],
        total_steps=10,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
        temperature=2.0,
        ce_weight=0.3,
        per_token=True,
        loss_impl="plain",
    )
    settings = AdaptiveKD(source="correctness", tau=0.5)
    student = TinyLM()
    one_loss, one_grads = adaptive_step(student, obj, x, teacher, labels, mask, [(0, 3)], settings)
    loss, grads = adaptive_step(student, obj, x, teacher, labels, mask, bounds, settings)
    assert loss == pytest.approx(one_loss, rel=1e-6)
    for got, want in zip(grads, one_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # Sensitive: weights normalised per micro-batch (each its own step) give another loss.
    naive = 0.0
    for xb, tb, yb, mb in micro_split(bounds, x, teacher, labels, mask):
        score = log_scores(dense_confidence(tb, labels=yb), settings)
        total, count = step_totals([score], [mb])
        weights = position_weights(score, mb, total=total, count=count).double()
        rows = add_counts({}, Targets(labels=labels, kd_mask=mask).counts(per_token=True))
        naive += float(obj(0, Outputs(student(xb)), Outputs(tb), Targets(yb, kd_mask(weights, mb)), rows)[0].detach())
    assert abs(naive - one_loss) > 1e-4


def test_classifier_weights_per_sample_accumulate_exactly():
    """Classifiers: one weight per sample as the KD term's (B,) mask; two micro-batches give the one-batch loss."""
    teacher, student = seeded(0, 6, 5), seeded(1, 6, 5)
    labels = torch.tensor([0, 1, IGNORE_INDEX, 3, IGNORE_INDEX, 2])
    settings = AdaptiveKD(source="correctness", tau=0.5)

    def step(bounds):
        scores = [log_scores(dense_confidence(teacher[a:b], labels=labels[a:b]), settings) for a, b in bounds]
        total, count = step_totals(scores, [None] * len(scores))
        loss = 0.0
        for (a, b), score in zip(bounds, scores):
            weights = position_weights(score, None, total=total, count=count).double()
            loss += float(kd_divergence(student[a:b], teacher[a:b], temperature=2.0, mask=kd_mask(weights, None)))
        return loss / count

    assert step([(0, 2), (2, 6)]) == pytest.approx(step([(0, 6)]), rel=1e-6)
    assert step([(0, 6)]) != pytest.approx(float(forward_kl(student, teacher, temperature=2.0)) / 6, rel=1e-3)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_a_weighted_mask_in_the_large_vocabulary_paths_equals_the_plain_path(impl):
    """Phase B needs no change in the loss code: every path multiplies per-row values by a float mask."""
    hidden, weight = seeded(0, 2, 5, 3).float(), seeded(1, 11, 3).float()
    teacher = seeded(2, 2, 5, 11).float()
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    score = log_scores(signal_confidence(teacher, labels=labels), AdaptiveKD(source="correctness", tau=0.5))
    total, count = step_totals([score], [mask])
    float_mask = kd_mask(position_weights(score, mask, total=total, count=count), mask)
    ref_hidden = hidden.clone().requires_grad_()
    ref = forward_kl(ref_hidden @ weight.T, teacher, temperature=2.0, mask=float_mask)
    leaf = hidden.clone().requires_grad_()
    if impl == "chunked":
        out = chunked_kd_ce(leaf @ weight.T, teacher, mask=float_mask, temperature=2.0, chunk_rows=2)
    else:
        out = fused_kd_ce(HiddenStates(leaf, weight), teacher, mask=float_mask, temperature=2.0, chunk_rows=2)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, leaf)[0], torch.autograd.grad(ref, ref_hidden)[0], rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- the combined teacher, summary, settings


def test_the_combined_teachers_confidence_is_that_of_the_mixture_at_its_temperature():
    logits = [seeded(i, 2, 3, 6) for i in range(2)]
    mixed = combine_teachers(logits, temperature=2.0, combination=Combination("weights", weights=(1, 3)), chunk_rows=2)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [0, 5, 2]])
    got = mixed.confidence(labels=labels, temperature=1.5)
    for b in range(2):
        for t in range(3):
            p = 0.25 * np_softmax(logits[0][b, t].numpy(), 1.5) + 0.75 * np_softmax(logits[1][b, t].numpy(), 1.5)
            assert float(got.entropy[b, t]) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
            if labels[b, t] != IGNORE_INDEX:
                assert float(got.label_nll[b, t]) == pytest.approx(-math.log(p[labels[b, t]]), rel=1e-9)
    assert signal_confidence(mixed, temperature=1.5).entropy.shape == (2, 3)


def test_summary_matches_numpy_percentiles():
    weights = [torch.tensor([[0.5, 2.0, 9.0]]), torch.tensor([[1.0, 0.25, 3.0], [4.0, 7.0, 0.1]])]
    masks = [torch.tensor([[True, True, False]]), torch.tensor([[True, True, True], [False, True, True]])]
    real = np.array([0.5, 2.0, 1.0, 0.25, 3.0, 7.0, 0.1])
    got = summary(weights, masks)
    assert got["min"] == pytest.approx(0.1) and got["max"] == pytest.approx(7.0)
    for name, q in (("p10", 10), ("p50", 50), ("p90", 90)):
        assert got[name] == pytest.approx(float(np.percentile(real, q)), rel=1e-6)  # float32 inputs
    assert got["mean"] == pytest.approx(float(real.mean()))
    assert summary([torch.zeros(1, 2)], [torch.zeros(1, 2, dtype=torch.bool)]) == {}


@pytest.mark.parametrize(
    "settings, expected",
    [
        (AdaptiveKD(source="margin"), "source 'margin' is unknown; allowed: entropy, correctness"),
        (AdaptiveKD(prefer="hard"), "prefer 'hard' is unknown; allowed: confident, uncertain"),
        (AdaptiveKD(tau=0.0), "tau must be a positive number, got 0.0"),
        (AdaptiveKD(confidence_temperature=math.inf), "confidence_temperature must be a positive number"),
    ],
)
def test_bad_settings_are_refused_in_one_line(settings, expected):
    with pytest.raises(UserError) as excinfo:
        settings.check()
    assert expected in str(excinfo.value) and "\n" not in str(excinfo.value)
