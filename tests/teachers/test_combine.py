"""N teachers combined into one distribution (teachers/combine.py, topk.py, weighting.py) against hand
computations and a plain numpy re-implementation, loop by loop over positions.

Float64 inputs keep the whole computation in float64, so those comparisons are tight (rel 1e-9);
float32 ones use the float32 bar of tests/losses/test_chunked.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distilflow.errors import UserError
from distilflow.losses.chunked import chunked_kd_ce
from distilflow.losses.confidence import expand_topk
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.logits import DIVERGENCES, forward_kl
from distilflow.losses.objective import Outputs
from distilflow.losses.sparse import SparseTeacher, topk_divergence
from distilflow.teachers.combine import MixedTeacher, combine_outputs, combine_teachers
from distilflow.teachers.topk import combine_topk
from distilflow.teachers.weighting import RULES, Combination

IGNORE = -100


def close64(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected), rtol=1e-9, atol=1e-12)


def seeded(seed: int, *shape: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def topk_of(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    values, ids = F.log_softmax(teacher_logits / temperature, dim=-1).topk(k, dim=-1)
    return SparseTeacher(ids, values, "topk", temperature)


# ---------------------------------------------------------------- numpy reference


def np_softmax(row, temperature=1.0):
    z = np.asarray(row, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def np_entropy(p):
    return float(-sum(x * math.log(x) for x in p if x > 0))


def np_weights(rule, dists, label, *, tau=1.0, fixed=None, fallback="entropy"):
    """Weights of N teachers at ONE position from their distributions at the confidence temperature."""
    n = len(dists)

    def softmax(scores):
        e = np.exp(np.asarray(scores) - max(scores))
        return e / e.sum()

    def rule_weights(name):
        if name == "mean":
            return np.full(n, 1.0 / n)
        if name == "weights":
            return np.asarray(fixed, dtype=np.float64) / sum(fixed)
        return softmax([-np_entropy(p) / tau for p in dists])  # entropy

    if rule in ("correctness", "camkd"):
        if label == IGNORE:
            return rule_weights(fallback)
        nll = [-math.log(p[label]) for p in dists]
        if rule == "correctness":
            return softmax([-x / tau for x in nll])
        return (1.0 - softmax([x / tau for x in nll])) / (n - 1)
    return rule_weights(rule)


def np_mixture(teacher_logits, labels, *, temperature, rule, tau=1.0, fixed=None, fallback="entropy", at=1.0):
    """(P, V) mixed probabilities and (P, N) weights of the flattened positions, one at a time."""
    flat = [z.detach().numpy().reshape(-1, z.shape[-1]) for z in teacher_logits]
    flat_labels = labels.reshape(-1).tolist() if labels is not None else [IGNORE] * len(flat[0])
    mixed, weights = [], []
    for pos in range(len(flat[0])):
        dists = [np_softmax(z[pos], at) for z in flat]
        w = np_weights(rule, dists, flat_labels[pos], tau=tau, fixed=fixed, fallback=fallback)
        mixed.append(sum(wi * np_softmax(z[pos], temperature) for wi, z in zip(w, flat)))
        weights.append(w)
    return np.stack(mixed), np.stack(weights)


# ---------------------------------------------------------------- mean and fixed weights by hand


def hand_teachers():
    """Two classifier teachers over 3 classes whose probabilities at T = 1 are round numbers."""
    probs = [[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]
    return [torch.tensor([probs[0]], dtype=torch.float64).log(), torch.tensor([probs[1]], dtype=torch.float64).log()]


def test_mean_and_weights_by_hand_at_t1():
    teachers = hand_teachers()
    mean = combine_teachers(teachers, temperature=1.0, combination=Combination("mean"))
    close64(mean.log_probs_at().exp(), [[0.3, 0.425, 0.275]])
    weighted = combine_teachers(teachers, temperature=1.0, combination=Combination("weights", weights=(1.0, 3.0)))
    # 0.25 * (0.5, 0.25, 0.25) + 0.75 * (0.1, 0.6, 0.3)
    close64(weighted.log_probs_at().exp(), [[0.2, 0.5125, 0.2875]])
    close64(weighted.weights_at(), [[0.25, 0.75]])


def test_the_tempered_distributions_are_mixed_by_hand_at_t2():
    """At T = 2 each teacher's softmax(z / 2) is sqrt(p) renormalised; the mixture is of those."""
    teachers = hand_teachers()
    first = [math.sqrt(x) for x in (0.5, 0.25, 0.25)]
    second = [math.sqrt(x) for x in (0.1, 0.6, 0.3)]
    first, second = [x / sum(first) for x in first], [x / sum(second) for x in second]
    expected = [0.5 * a + 0.5 * b for a, b in zip(first, second)]
    mixed = combine_teachers(teachers, temperature=2.0, combination=Combination("mean"))
    close64(mixed.log_probs_at().exp(), [expected])
    # What the KD term reads: T * log p, whose log_softmax at T is log p exactly.
    close64(F.log_softmax(mixed.logits_at() / 2.0, dim=-1).exp(), [expected])
    # Not the tempered T = 1 mixture: (0.3, 0.425, 0.275) ** (1/2), renormalised.
    tempered_after = [math.sqrt(x) for x in (0.3, 0.425, 0.275)]
    tempered_after = [x / sum(tempered_after) for x in tempered_after]
    assert abs(expected[0] - tempered_after[0]) > 1e-3


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_term_against_the_mixture_is_the_divergence_to_p_t(divergence):
    """The KD term on ``logits_at()`` equals T^2 D(p_T mix, q_T) computed by hand in numpy."""
    temperature, beta = 2.0, 0.3
    teachers = [seeded(i, 4, 5) for i in range(3)]
    student = seeded(9, 4, 5)
    mixed = combine_teachers(teachers, temperature=temperature, combination=Combination("weights", weights=(1, 2, 5)))
    p, _ = np_mixture(teachers, None, temperature=temperature, rule="weights", fixed=(1, 2, 5))
    expected = 0.0
    for row in range(4):
        q = np_softmax(student[row].numpy(), temperature)
        kl = lambda a, b: float(np.sum(a * np.log(a / b)))  # noqa: E731
        if divergence == "forward_kl":
            expected += kl(p[row], q)
        elif divergence == "reverse_kl":
            expected += kl(q, p[row])
        else:
            m = beta * p[row] + (1 - beta) * q
            expected += beta * kl(p[row], m) + (1 - beta) * kl(q, m)
    extra = {"beta": beta} if divergence == "jsd" else {}
    got = DIVERGENCES[divergence](student, mixed.logits_at(), temperature=temperature, **extra)
    assert float(got) == pytest.approx(temperature**2 * expected, rel=1e-9)


def test_forward_kl_gradient_is_the_weighted_sum_of_the_teachers_gradients():
    """Why the tempered distributions are mixed: at T, the student's forward-KL gradient against the
    mixture equals sum_i w_i * (its gradient against teacher i alone), per sample, adaptive weights too."""
    temperature = 2.0
    teachers = [seeded(i, 5, 6) for i in range(3)]
    student = seeded(7, 5, 6).requires_grad_()
    mixed = combine_teachers(teachers, temperature=temperature, combination=Combination("entropy", tau=0.5))
    weights = mixed.weights_at()  # (5, 3)
    assert float((weights.max(-1).values - weights.min(-1).values).min()) > 1e-3  # really per-sample
    (grad,) = torch.autograd.grad(forward_kl(student, mixed.logits_at(), temperature=temperature), student)
    expected = torch.zeros_like(student)
    for i, teacher in enumerate(teachers):
        per_row = torch.stack([forward_kl(student[r], teacher[r], temperature=temperature) for r in range(5)])  # (5,)
        (g,) = torch.autograd.grad((weights[:, i].detach() * per_row).sum(), student)
        expected += g
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-12)
    # Mixing the T = 1 distributions and tempering the mixture would give another gradient.
    at_one = combine_teachers(teachers, temperature=1.0, combination=Combination("entropy", tau=0.5))
    (other,) = torch.autograd.grad(forward_kl(student, at_one.logits_at(), temperature=temperature), student)
    assert float((other - expected).abs().max()) > 1e-3


# ---------------------------------------------------------------- adaptive weights


def lm_case(seed=0, teachers=3, b=2, t=4, v=6):
    logits = [seeded(seed + i, b, t, v, scale=1.0 + i) for i in range(teachers)]  # teachers of different sharpness
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed + 50))
    labels[0, :2] = IGNORE  # a prompt
    labels[1, -1] = IGNORE  # padding
    return logits, labels


@pytest.mark.parametrize("rule", ["entropy", "correctness", "camkd"])
@pytest.mark.parametrize("at", [1.0, 2.0])
@pytest.mark.parametrize("fallback", ["entropy", "weights", "mean"])
def test_adaptive_weights_per_token_match_numpy(rule, at, fallback):
    temperature, tau = 2.0, 0.7
    logits, labels = lm_case()
    combination = Combination(rule, weights=(1.0, 2.0, 0.5), tau=tau, fallback=fallback, confidence_temperature=at)
    mixed = combine_teachers(logits, temperature=temperature, combination=combination, labels=labels)
    p, w = np_mixture(
        logits, labels, temperature=temperature, rule=rule, tau=tau, fixed=(1.0, 2.0, 0.5), fallback=fallback, at=at
    )
    close64(mixed.weights_at().reshape(-1, 3), w)
    close64(mixed.log_probs_at().exp().reshape(-1, 6), p)


def test_entropy_and_correctness_weights_by_hand():
    """Teachers (0.5, 0.25, 0.25) and (0.1, 0.6, 0.3), label 1, tau = 1."""
    teachers = hand_teachers()
    entropies = [
        0.5 * math.log(2) + 0.5 * math.log(4),
        -(0.1 * math.log(0.1) + 0.6 * math.log(0.6) + 0.3 * math.log(0.3)),
    ]
    e = [math.exp(-h) for h in entropies]
    by_entropy = combine_teachers(teachers, temperature=1.0, combination=Combination("entropy"))
    close64(by_entropy.weights_at(), [[e[0] / sum(e), e[1] / sum(e)]])
    labels = torch.tensor([1])
    for rule in ("correctness", "camkd"):  # equal for two teachers: p_i(label) / sum_j p_j(label)
        mixed = combine_teachers(teachers, temperature=1.0, combination=Combination(rule), labels=labels)
        close64(mixed.weights_at(), [[0.25 / 0.85, 0.6 / 0.85]])


def test_camkd_differs_from_correctness_for_three_teachers():
    logits, labels = lm_case()
    camkd = combine_teachers(logits, temperature=1.0, combination=Combination("camkd"), labels=labels).weights_at()
    softmax = combine_teachers(logits, temperature=1.0, combination=Combination("correctness"), labels=labels)
    labelled = labels != IGNORE
    assert float((camkd - softmax.weights_at())[labelled].abs().max()) > 1e-3
    assert float(camkd[labelled].max()) <= 0.5 + 1e-12  # (1 - softmax) / (N - 1) never passes 1 / (N - 1)


def test_label_rules_without_labels_fall_back_everywhere():
    logits, _ = lm_case()
    no_labels = combine_teachers(logits, temperature=2.0, combination=Combination("correctness"))
    by_entropy = combine_teachers(logits, temperature=2.0, combination=Combination("entropy"))
    close64(no_labels.weights_at(), by_entropy.weights_at())


# ---------------------------------------------------------------- routing


def test_routing_sends_a_row_to_one_teacher_and_the_rest_to_the_rule():
    temperature = 2.0
    logits, labels = lm_case(b=3)
    labels = torch.randint(0, 6, (3, 4), generator=torch.Generator().manual_seed(3))
    route = torch.tensor([2, -1, 0])
    combination = Combination("correctness")
    routed = combine_teachers(logits, temperature=temperature, combination=combination, labels=labels, route=route)
    plain = combine_teachers(logits, temperature=temperature, combination=combination, labels=labels)
    lp = routed.log_probs_at()
    # Every token of row 0 is teacher 2's distribution, of row 2 teacher 0's (weights exactly one-hot).
    close64(lp[0], F.log_softmax(logits[2][0] / temperature, dim=-1))
    close64(lp[2], F.log_softmax(logits[0][2] / temperature, dim=-1))
    close64(routed.weights_at()[0], [[0.0, 0.0, 1.0]] * 4)
    # The unrouted row keeps the default combination.
    close64(lp[1], plain.log_probs_at()[1])


def test_routing_of_topk_caches_keeps_the_routed_cache_as_it_is():
    """A routed position is the routed cache exactly: the other teachers (weight 0) add no ids."""
    temperature, v = 2.0, 9
    logits, _ = lm_case(v=v, teachers=2)
    caches = [topk_of(z, 3, temperature) for z in logits]
    union = combine_teachers(
        caches, temperature=temperature, combination=Combination("mean"), vocab_size=v, route=torch.tensor([1, -1])
    )
    assert union.ids.shape[-1] >= 4  # the unrouted row holds the union of two different top-3 sets
    for t in range(4):
        kept = ~torch.isneginf(union.values[0, t])
        assert int(kept.sum()) == 3
        assert set(union.ids[0, t][kept].tolist()) == set(caches[1].ids[0, t].tolist())
    student = seeded(5, 1, 4, v)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        got = topk_divergence(student, _rows(union, 0), divergence=divergence, temperature=temperature)
        want = topk_divergence(student, _rows(caches[1], 0), divergence=divergence, temperature=temperature)
        close64(got, want)


def _rows(teacher: SparseTeacher, row: int) -> SparseTeacher:
    return SparseTeacher(teacher.ids[row : row + 1], teacher.values[row : row + 1], "topk", teacher.temperature)


# ---------------------------------------------------------------- top-k caches


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("routed", [False, True])
def test_topk_union_with_k_equal_to_v_is_the_dense_mixture(rule, routed):
    temperature, v = 2.0, 6
    logits, labels = lm_case(v=v)
    route = torch.tensor([1, -1]) if routed else None
    combination = Combination(rule, weights=(3.0, 1.0, 1.0), tau=0.8, confidence_temperature=1.5)
    options = dict(temperature=temperature, combination=combination, labels=labels, route=route)
    dense = combine_teachers(logits, **options)
    union = combine_teachers([topk_of(z, v, temperature) for z in logits], vocab_size=v, **options)
    assert isinstance(union, SparseTeacher) and union.ids.shape[-1] == v
    close64(expand_topk(union, v), dense.log_probs_at())
    student = seeded(11, 2, 4, v)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        got = topk_divergence(student, union, divergence=divergence, temperature=temperature)
        extra = {"beta": 0.5} if divergence == "jsd" else {}
        want = DIVERGENCES[divergence](student, dense.logits_at(), temperature=temperature, **extra)
        assert float(got) == pytest.approx(float(want), rel=1e-9)


def test_topk_union_by_hand():
    """V = 5, K = 2, T = 1, mean of two caches with overlapping ids.

    Cache A: ids (0, 1) at (0.5, 0.3), tail 0.2 over 3 ids -> 0.2 / 3 each. Cache B: ids (1, 2) at
    (0.6, 0.1), tail 0.3 over 3 ids -> 0.1 each. Union {0, 1, 2}: id 0 = (0.5 + 0.1) / 2, id 1 = (0.3 + 0.6) / 2,
    id 2 = (0.2/3 + 0.1) / 2; the union's tail (ids 3, 4) = (2 * 0.2/3 + 2 * 0.1) / 2.
    """
    a = SparseTeacher(torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]], dtype=torch.float64).log(), "topk", 1.0)
    b = SparseTeacher(torch.tensor([[2, 1]]), torch.tensor([[0.1, 0.6]], dtype=torch.float64).log(), "topk", 1.0)
    union = combine_topk([a, b], temperature=1.0, combination=Combination("mean"), vocab_size=5)
    got = {int(i): float(v) for i, v in zip(union.ids[0], union.values[0].exp()) if v > 0}
    assert got.keys() == {0, 1, 2}
    assert got[0] == pytest.approx(0.3, rel=1e-12)
    assert got[1] == pytest.approx(0.45, rel=1e-12)
    assert got[2] == pytest.approx((0.2 / 3 + 0.1) / 2, rel=1e-12)
    assert 1 - sum(got.values()) == pytest.approx((2 * 0.2 / 3 + 2 * 0.1) / 2, rel=1e-9)


def test_topk_union_equals_the_dense_mixture_of_the_expanded_caches():
    """With K < V, the union is the dense mixture of each cache with its tail spread uniformly (the
    union's own tail then spreads to the same value on every id it lacks), for adaptive weights too;
    padding slots and repeated ids across caches included."""
    temperature, v = 1.5, 11
    logits, labels = lm_case(v=v)
    caches = [topk_of(z, k, temperature) for z, k in zip(logits, (2, 3, 4))]
    padded = caches[2]
    values = padded.values.clone()
    values[0, 1, -1] = -math.inf  # a position with fewer ids; its slot names an id another slot holds
    ids = padded.ids.clone()
    ids[0, 1, -1] = ids[0, 1, 0]
    caches[2] = SparseTeacher(ids, values, "topk", temperature)
    for rule in ("mean", "entropy", "correctness"):
        options = dict(temperature=temperature, combination=Combination(rule, tau=0.5), labels=labels, vocab_size=v)
        union = combine_topk(caches, **options)
        lazy = MixedTeacher(caches, **options)  # expands each cache to (..., V), then mixes
        close64(expand_topk(union, v), lazy.log_probs_at())
        assert union.ids.shape[-1] <= 2 + 3 + 4
        kept = ~torch.isneginf(union.values)
        for pos_ids, pos_kept in zip(union.ids.reshape(-1, union.ids.shape[-1]), kept.reshape(-1, kept.shape[-1])):
            listed = pos_ids[pos_kept].tolist()
            assert len(listed) == len(set(listed))  # distinct ids, as the bucket loss needs


def test_a_live_teacher_and_a_topk_cache_mix_densely():
    temperature, v = 2.0, 7
    logits, labels = lm_case(v=v, teachers=2)
    cache = topk_of(logits[1], 3, temperature)
    mixed = combine_teachers(
        [logits[0], cache], temperature=temperature, combination=Combination("weights", weights=(1, 3))
    )
    assert isinstance(mixed, MixedTeacher)
    # numpy: the cache's 3 values, the rest of its mass spread over the other 4 ids
    expected = np.zeros((2, 4, v))
    for b in range(2):
        for t in range(4):
            spread = np.full(v, (1.0 - cache.values[b, t].exp().sum().item()) / (v - 3))
            spread[cache.ids[b, t].numpy()] = cache.values[b, t].exp().numpy()
            expected[b, t] = 0.25 * np_softmax(logits[0][b, t].numpy(), temperature) + 0.75 * spread
    close64(mixed.log_probs_at().exp(), expected)


# ---------------------------------------------------------------- rows on demand


def test_rows_on_demand_and_in_sub_chunks_equal_the_whole():
    logits, labels = lm_case(b=2, t=5)
    combination = Combination("correctness")
    whole = combine_teachers(logits, temperature=2.0, combination=combination, labels=labels).log_probs_at()
    for chunk_rows in (1, 2, 3):
        lazy = combine_teachers(logits, temperature=2.0, combination=combination, labels=labels, chunk_rows=chunk_rows)
        close64(lazy.log_probs_at(), whole)
        close64(lazy.log_probs_at((1, slice(1, 4))), whole[1, 1:4])


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_the_large_vocabulary_losses_read_the_mixture_one_chunk_at_a_time(impl):
    """chunked_kd_ce / fused_kd_ce ask the mixture for rows per chunk (losses/chunked.teacher_rows); the
    result equals the plain KD against the materialised mixture, in value and gradient, float32."""
    temperature = 2.0
    teacher_hidden = [seeded(i, 3, 5, 4).float() for i in range(2)]
    teacher_heads = [seeded(10 + i, 13, 4).float() for i in range(2)]
    teachers = [HiddenStates(h, w) for h, w in zip(teacher_hidden, teacher_heads)]
    labels = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(2))
    mixed = combine_teachers(teachers, temperature=temperature, combination=Combination("camkd"), labels=labels)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    hidden, head = seeded(4, 3, 5, 4).float(), seeded(5, 13, 4).float()
    ref_leaf, leaf = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ref = forward_kl(ref_leaf @ head.T, mixed.logits_at(), temperature=temperature, mask=mask)
    options = dict(mask=mask, temperature=temperature, chunk_rows=2)
    if impl == "chunked":
        out = chunked_kd_ce(leaf @ head.T, mixed, **options)
    else:
        out = fused_kd_ce(HiddenStates(leaf, head), mixed, **options)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(out.loss, leaf)[0], torch.autograd.grad(ref, ref_leaf)[0], rtol=1e-5, atol=1e-7
    )


def test_hidden_state_teachers_mix_like_their_logits():
    hidden = [seeded(i, 2, 3, 4) for i in range(2)]
    heads = [seeded(10 + i, 9, 4) for i in range(2)]
    as_hidden = [HiddenStates(h, w) for h, w in zip(hidden, heads)]
    as_logits = [h @ w.T for h, w in zip(hidden, heads)]
    combination = Combination("entropy")
    got = combine_teachers(as_hidden, temperature=2.0, combination=combination, chunk_rows=1).log_probs_at()
    close64(got, combine_teachers(as_logits, temperature=2.0, combination=combination).log_probs_at())


def test_combine_outputs_takes_the_features_of_the_named_teacher():
    logits, _ = lm_case(teachers=2)
    outputs = [Outputs(z, [torch.full((2, 4, 3), float(i))]) for i, z in enumerate(logits)]
    out = combine_outputs(outputs, feature_teacher=1, temperature=2.0, combination=Combination("mean"))
    assert isinstance(out.logits, MixedTeacher)
    assert len(out.features) == 1 and float(out.features[0].mean()) == 1.0
    assert combine_outputs(outputs, temperature=2.0, combination=Combination("mean")).features == []


# ---------------------------------------------------------------- bad input


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda z: ([z, z[..., :5]], {}), "teacher 1 scores 5 classes/vocabulary ids but teacher 0 6"),
        (lambda z: ([z, z], {"vocab_size": 7}), "teacher 0 scores 6 classes/vocabulary ids but the student 7"),
        (lambda z: ([z, z[:1]], {}), "different positions"),
        (lambda z: ([z, topk_of(z, 2, 2.0)], {}), None),  # fine: a live teacher and a topk cache
        (
            lambda z: ([z, SparseTeacher(topk_of(z, 2, 2.0).ids, torch.full((2, 4, 2), 0.5), "sampled", 2.0)], {}),
            "'sampled' cache",
        ),
        (
            lambda z: ([z, topk_of(z, 2, 1.0)], {}),
            "teacher 1: the teacher cache was written at temperature 1 but distill.temperature is 2",
        ),
        (
            lambda z: ([z, SparseTeacher(torch.full((2, 4, 1), 6), torch.zeros(2, 4, 1), "topk", 2.0)], {}),
            "teacher 1: the teacher cache holds vocabulary id 6 but the student scores 6 ids",
        ),
        (lambda z: ([z, z], {"route": torch.tensor([0, 2])}), "names teacher index 2"),
        (lambda z: ([z, z], {"route": torch.tensor([-2, 0])}), "names teacher index -2"),
    ],
)
def test_signals_that_cannot_be_combined_are_refused_in_one_line(make, expected):
    logits, _ = lm_case(teachers=1)
    signals, extra = make(logits[0])
    if expected is None:
        combine_teachers(signals, temperature=2.0, combination=Combination("mean"), **extra)
        return
    with pytest.raises(UserError) as excinfo:
        combine_teachers(signals, temperature=2.0, combination=Combination("mean"), **extra)
    assert expected in one_line(excinfo)


@pytest.mark.parametrize(
    "combination, expected",
    [
        (Combination("median"), "rule 'median' is unknown; allowed: mean, weights, entropy, correctness, camkd"),
        (Combination("weights"), "needs a list of 2 positive weights"),
        (Combination("weights", weights=(1.0,)), "got 1 weights for 2 teachers"),
        (Combination("weights", weights=(1.0, 0.0)), "must be positive numbers, got 0.0"),
        (Combination("weights", weights=(1.0, -2.0)), "must be positive numbers, got -2.0"),
        (Combination("weights", weights=(1.0, math.nan)), "must be positive numbers, got nan"),
        (Combination("correctness", fallback="weights"), "needs a list of 2 positive weights"),
        (Combination("entropy", fallback="best"), "fallback 'best' is unknown"),
        (Combination("entropy", tau=0.0), "tau must be a positive number"),
        (Combination("entropy", confidence_temperature=-1.0), "confidence_temperature must be a positive number"),
    ],
)
def test_bad_combination_settings_are_refused_in_one_line(combination, expected):
    logits, _ = lm_case(teachers=2)
    with pytest.raises(UserError) as excinfo:
        combine_teachers(logits, temperature=2.0, combination=combination)
    assert expected in one_line(excinfo)


def test_camkd_needs_two_teachers():
    logits, _ = lm_case(teachers=1)
    with pytest.raises(UserError) as excinfo:
        combine_teachers(logits, temperature=2.0, combination=Combination("camkd"))
    assert "needs at least 2 teachers" in one_line(excinfo)
