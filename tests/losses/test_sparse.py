"""Losses against a sparse teacher (cached top-k or sampled ids) against hand computations, the full
KD, and the plain / chunked / fused paths against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distilflow.config import KDWeightConfig
from distilflow.errors import UserError
from distilflow.losses.chunked import chunked_kd_ce
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.logits import DIVERGENCES
from distilflow.losses.objective import Objective, Outputs, Targets
from distilflow.losses.sparse import SparseTeacher, sampled_forward_kl, sparse_divergence, topk_divergence
from distilflow.schedules import Phase

from .conftest import DIVERGENCE_NAMES, assert_close

V = 23


def topk_of(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    """What a top-k cache holds: the k largest teacher log-probabilities at T and their ids."""
    values, ids = F.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)
    return SparseTeacher(ids, values, "topk", temperature)


def logits(seed: int, *shape: int) -> torch.Tensor:
    return 2.0 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_to_v_is_the_full_kd(divergence, temperature):
    student, teacher = logits(0, 2, 5, V), logits(1, 2, 5, V)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    extra = {"beta": 0.4} if divergence == "jsd" else {}
    ref_leaf, leaf = student.clone().requires_grad_(), student.clone().requires_grad_()
    full = DIVERGENCES[divergence](ref_leaf, teacher, temperature=temperature, mask=mask, **extra)
    cached = topk_of(teacher, V, temperature)
    sparse = topk_divergence(leaf, cached, divergence=divergence, temperature=temperature, mask=mask, beta=0.4)
    assert_close(sparse.detach(), full.detach())
    assert_close(torch.autograd.grad(sparse, leaf)[0], torch.autograd.grad(full, ref_leaf)[0])


def bucket_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_topk_tail_bucket_by_hand(divergence):
    """k = 2 of V = 5 at T = 2: three buckets per side, the third holding the rest of the mass."""
    temperature, beta = 2.0, 0.3
    student = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.5]])
    teacher = torch.tensor([[1.0, 3.0, -2.0, 0.5, 0.0]])
    p = [math.exp(x / temperature) for x in teacher[0].tolist()]
    q = [math.exp(x / temperature) for x in student[0].tolist()]
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    # The teacher's top 2: ids 1 and 0.
    p_buckets = [p[1], p[0], 1 - p[1] - p[0]]
    q_buckets = [q[1], q[0], q[2] + q[3] + q[4]]
    if divergence == "forward_kl":
        expected = bucket_kl(p_buckets, q_buckets)
    elif divergence == "reverse_kl":
        expected = bucket_kl(q_buckets, p_buckets)
    else:
        m = [beta * a + (1 - beta) * b for a, b in zip(p_buckets, q_buckets)]
        expected = beta * bucket_kl(p_buckets, m) + (1 - beta) * bucket_kl(q_buckets, m)
    got = topk_divergence(
        student, topk_of(teacher, 2, temperature), divergence=divergence, temperature=temperature, beta=beta
    )
    assert float(got) == pytest.approx(temperature**2 * expected, rel=1e-5)


def test_topk_padding_slots_are_empty_buckets():
    """A position with fewer than K ids (value -inf, any id) equals the same position with K' slots."""
    student, teacher = logits(2, 1, V), logits(3, 1, V)
    three = topk_of(teacher, 3, 1.0)
    padded = SparseTeacher(
        torch.cat([three.ids, three.ids[:, :1], torch.tensor([[7]])], -1),  # a repeated id and another id
        torch.cat([three.values, torch.full((1, 2), -math.inf)], -1),
        "topk",
        1.0,
    )
    for divergence in DIVERGENCE_NAMES:
        ref = topk_divergence(student, three, divergence=divergence)
        assert_close(topk_divergence(student, padded, divergence=divergence), ref)


def test_sampled_mean_gradient_approaches_the_full_kd_gradient():
    """Draws of n ids from p_T with weights count / n: the mean gradient over M independent draws
    (fixed seed) is within 6 standard deviations of the full forward-KL gradient T * (q_T - p_T).

    Per draw the gradient is T * (q_T - w) with w the empirical frequencies, Var(w_j) = p_j (1 - p_j) / n,
    so the mean over M draws has standard deviation T * sqrt(p_j (1 - p_j) / (n M)); 6 of them are
    exceeded with probability < 1e-8 per entry by any seed: the bound does not flake, yet a biased
    estimator (e.g. the top-n ids renormalised) misses it by far (checked below).
    """
    temperature, n, draws = 2.0, 12, 4000
    student, teacher = logits(4, 3, V), logits(5, 3, V)
    p = F.softmax(teacher / temperature, dim=-1)  # (3, V)
    q = F.softmax(student / temperature, dim=-1)
    g = torch.Generator().manual_seed(0)
    ids = torch.multinomial(p.repeat(draws, 1), n, replacement=True, generator=g).view(draws, 3, n)
    weights = torch.full((draws, 3, n), 1.0 / n)  # repeated ids kept as separate slots: same estimator
    leaf = student.clone().requires_grad_()
    stacked = leaf.expand(draws, 3, V)
    total = sampled_forward_kl(stacked, SparseTeacher(ids, weights, "sampled", temperature), temperature=temperature)
    (grad,) = torch.autograd.grad(total / draws, leaf)
    full = temperature * (q - p)
    sigma = temperature * torch.sqrt(p * (1 - p) / (n * draws))
    assert torch.all((grad - full).abs() <= 6 * sigma + 1e-6)
    # The value: an unbiased estimate of KL + H(p_T) (the teacher's entropy, a constant), within 6
    # standard deviations of -log q_T(id) under p_T, per row, over n * M draws.
    kl = float(DIVERGENCES["forward_kl"](student, teacher, temperature=temperature))
    entropy = float(-(p * p.log()).sum()) * temperature**2
    log_q = q.log()
    row_var = (p * log_q**2).sum(-1) - (p * log_q).sum(-1) ** 2
    value_sigma = temperature**2 * math.sqrt(float(row_var.sum()) / (n * draws))
    assert abs(float(total.detach()) / draws - (kl + entropy)) <= 6 * value_sigma
    # A biased estimator misses the bound: the top-n ids of p renormalised.
    top = topk_of(teacher, n, temperature)
    renormalised = SparseTeacher(top.ids, F.softmax(top.values, -1), "sampled", temperature)
    leaf2 = student.clone().requires_grad_()
    (biased,) = torch.autograd.grad(sampled_forward_kl(leaf2, renormalised, temperature=temperature), leaf2)
    assert torch.any((biased - full).abs() > 6 * sigma + 1e-6)


def test_bad_sparse_teachers_are_refused_in_one_line():
    student = logits(6, 2, V)
    sampled = SparseTeacher(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), 1 / 3), "sampled", 1.0)
    with pytest.raises(UserError, match="'reverse_kl' cannot use a sampled teacher cache"):
        sparse_divergence(student, sampled, divergence="reverse_kl")
    with pytest.raises(UserError, match="temperature 1 but distill.temperature is 2"):
        sparse_divergence(student, sampled, temperature=2.0)
    wide = SparseTeacher(torch.full((2, 3), V), torch.zeros(2, 3), "topk", 1.0)
    with pytest.raises(UserError, match=f"vocabulary id {V} but the student scores {V} ids"):
        sparse_divergence(student, wide)


@pytest.mark.parametrize(
    ("kind", "divergence"), [("topk", name) for name in DIVERGENCE_NAMES] + [("sampled", "forward_kl")]
)
def test_chunked_and_fused_equal_plain_with_a_sparse_teacher(kind, divergence):
    g = torch.Generator().manual_seed(7)
    hidden, weight, bias = (
        torch.randn(2, 6, 5, generator=g),
        torch.randn(V, 5, generator=g),
        torch.randn(V, generator=g),
    )
    teacher_logits = 2.0 * torch.randn(2, 6, V, generator=g)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[0, 0] = -100
    mask = labels != -100
    if kind == "topk":
        teacher = topk_of(teacher_logits, 4, 2.0)
    else:
        ids = torch.multinomial(F.softmax(teacher_logits / 2.0, -1).view(-1, V), 5, replacement=True, generator=g)
        teacher = SparseTeacher(ids.view(2, 6, 5), torch.full((2, 6, 5), 0.2), "sampled", 2.0)
    options = dict(divergence=divergence, temperature=2.0, beta=0.5, kd_weight=0.6, ce_weight=0.4)

    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    student_logits = F.linear(*ref)
    ref_total = 0.6 * sparse_divergence(
        student_logits, teacher, divergence=divergence, temperature=2.0, mask=mask
    ) + 0.4 * F.cross_entropy(student_logits.reshape(-1, V), labels.reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref_total, ref)

    mine = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    fused = fused_kd_ce(HiddenStates(*mine), teacher, labels, mask=mask, chunk_rows=4, **options)
    for grad, ref_grad in zip(torch.autograd.grad(fused.loss, mine), ref_grads):
        assert_close(grad, ref_grad)
    assert_close(fused.loss.detach(), ref_total.detach())

    leaf = F.linear(hidden, weight, bias).requires_grad_()
    ref_leaf = leaf.detach().clone().requires_grad_()
    chunked = chunked_kd_ce(leaf, teacher, labels, mask=mask, chunk_rows=4, **options)
    plain = 0.6 * sparse_divergence(ref_leaf, teacher, divergence=divergence, temperature=2.0, mask=mask) + 0.4 * (
        F.cross_entropy(ref_leaf.reshape(-1, V), labels.reshape(-1), reduction="sum")
    )
    assert_close(chunked.loss.detach(), plain.detach())
    assert_close(torch.autograd.grad(chunked.loss, leaf)[0], torch.autograd.grad(plain, ref_leaf)[0])


def test_objective_takes_a_sparse_teacher_in_every_implementation():
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(2, 6, 5, generator=g), torch.randn(V, 5, generator=g)
    teacher = topk_of(2.0 * torch.randn(2, 6, V, generator=g), 5, 2.0)
    labels = torch.randint(0, V, (2, 6), generator=g)
    targets = Targets(labels, labels != -100)
    rows = {"kd": 12, "ce": 12, "feature": 12}
    results = {}
    for impl in ("plain", "chunked", "fused"):
        objective = Objective(
            [Phase("joint", 0, 4, ("kd", "ce"))],
            total_steps=4,
            kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
            temperature=2.0,
            ce_weight=0.3,
            per_token=True,
            loss_impl=impl,
            chunk_rows=5,
        )
        leaf = weight.clone().requires_grad_()
        student = HiddenStates(hidden, leaf) if impl == "fused" else F.linear(hidden, leaf)
        loss, parts = objective(0, Outputs(student), Outputs(teacher), targets, rows)
        results[impl] = (loss.detach(), parts["kd"].detach(), torch.autograd.grad(loss, leaf)[0])
    for impl in ("chunked", "fused"):
        for got, expected in zip(results[impl], results["plain"]):
            assert_close(got, expected, impl)
