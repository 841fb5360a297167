"""The objective: phase -> terms -> weights -> parts, and exact gradient accumulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from distilflow.config import DEFAULT_PHASES, KDWeightConfig
from distilflow.losses.objective import IGNORE_INDEX, Objective, Outputs, Targets, add_counts
from distilflow.schedules import Phase, phase_boundaries

# ---------------------------------------------------------------- references


def ref_softmax(row, temperature=1.0):
    z = np.asarray(row, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def ref_kd_mean(student, teacher, temperature, mask=None):
    """Mean over selected rows of T^2 KL(p_teacher || p_student)."""
    s = student.detach().numpy().reshape(-1, student.shape[-1])
    t = teacher.detach().numpy().reshape(-1, teacher.shape[-1])
    keep = [True] * len(s) if mask is None else mask.reshape(-1).tolist()
    values = [
        temperature**2 * ref_kl(ref_softmax(t[i], temperature), ref_softmax(s[i], temperature))
        for i in range(len(s))
        if keep[i]
    ]
    return sum(values) / len(values)


def ref_ce_mean(student, labels):
    s = student.detach().numpy().reshape(-1, student.shape[-1])
    values = [-math.log(ref_softmax(row)[y]) for row, y in zip(s, labels.reshape(-1).tolist()) if y != IGNORE_INDEX]
    return sum(values) / len(values)


def ref_unit_sq_dist_mean(student, teacher):
    """Mean over rows (samples) of || s/|s| - t/|t| ||^2."""
    s = student.detach().numpy().reshape(student.shape[0], -1)
    t = teacher.detach().numpy().reshape(teacher.shape[0], -1)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return float(((s - t) ** 2).sum(1).mean())


# ---------------------------------------------------------------- tiny models


def seeded(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class TinyStudent(nn.Module):
    """x (..., 5) -> h1 (..., 3) -> h2 (..., 4) -> logits (..., C); h1 and h2 are the tapped features."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.lin1, self.lin2, self.lin3 = nn.Linear(5, 3), nn.Linear(3, 4), nn.Linear(4, num_classes)
        self.double()

    def forward(self, x):
        h1 = torch.tanh(self.lin1(x))
        h2 = torch.tanh(self.lin2(h1))
        return Outputs(logits=self.lin3(h2), features=[h1, h2])


def heads():
    torch.manual_seed(1)
    return nn.ModuleList([nn.Linear(3, 6), nn.Identity()]).double()


def objective(plan, *, per_token=False, divergence="forward_kl", temperature=2.0, kd=None):
    return Objective(
        plan,
        total_steps=plan[-1].end,
        kd_schedule=kd or KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
        temperature=temperature,
        divergence=divergence,
        jsd_beta=0.3,
        ce_weight=0.3,
        feature_weight=2.0,
        feature_loss="normalized_mse",
        layer_weights=[1.0, 0.5],
        heads=heads(),
        per_token=per_token,
    )


ALL_TERMS = [Phase("all", 0, 10, ("kd", "ce", "feature"))]


# ---------------------------------------------------------------- weights and parts


def test_weights_follow_the_phase_and_the_kd_schedule():
    plan = phase_boundaries(DEFAULT_PHASES, 10)  # [0, 2) feature, [2, 7) kd, [7, 10) kd + ce
    obj = objective(plan, kd=KDWeightConfig(schedule="article", base_weight=0.7, decay_rate=0.9, warmup_steps=0))
    assert obj.weights(0) == {"feature": 2.0}
    assert obj.weights(1) == {"feature": 2.0}
    assert obj.weights(2) == pytest.approx({"kd": 0.567})  # 0.7 * 0.9 ** 2
    assert obj.weights(6) == pytest.approx({"kd": 0.3720087})  # 0.7 * 0.531441
    assert obj.weights(7) == pytest.approx({"kd": 0.33480783, "ce": 0.3})  # 0.7 * 0.9 ** 7
    assert obj.weights(9) == pytest.approx({"kd": 0.27119434, "ce": 0.3})  # 0.7 * 0.387420489
    assert obj.phase(1).name == "feature_alignment" and obj.phase(2).name == "soft_label_pretrain"
    assert obj.needs_teacher


def test_kd_weight_warms_up_within_the_objective():
    plan = [Phase("kd", 0, 100, ("kd",))]
    obj = objective(plan, kd=KDWeightConfig(schedule="constant", base_weight=0.8, warmup_steps=4))
    assert [obj.weights(s)["kd"] for s in range(6)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8])


def classification_batch(batch=8, seed=0):
    x = seeded(batch, 5, seed=seed)
    teacher = Outputs(
        logits=seeded(batch, 4, seed=seed + 1) * 2,
        features=[seeded(batch, 6, seed=seed + 2), seeded(batch, 4, seed=seed + 3)],
    )
    labels = torch.tensor([0, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 1, 3, 0])[:batch]
    targets = Targets(labels=labels, kd_mask=torch.ones(batch, dtype=torch.bool))
    return x, teacher, targets


@pytest.mark.parametrize(
    "step, terms",
    [(0, {"feature"}), (1, {"feature"}), (2, {"kd"}), (6, {"kd"}), (7, {"kd", "ce"}), (9, {"kd", "ce"})],
)
def test_parts_only_for_active_terms_and_values_match_references(step, terms):
    plan = phase_boundaries(DEFAULT_PHASES, 10)
    obj = objective(plan)
    student = TinyStudent()
    x, teacher, targets = classification_batch()
    out = student(x)
    loss, parts = obj(step, out, teacher, targets, targets.counts(per_token=False))
    assert set(parts) == terms
    want = {
        "kd": ref_kd_mean(out.logits, teacher.logits, 2.0),
        "ce": ref_ce_mean(out.logits, targets.labels),
        "feature": 1.0 * ref_unit_sq_dist_mean(obj.heads[0](out.features[0]), teacher.features[0])
        + 0.5 * ref_unit_sq_dist_mean(out.features[1], teacher.features[1]),
    }
    for name in terms:
        assert parts[name].item() == pytest.approx(want[name], rel=1e-10), name
    weights = {"kd": 0.7, "ce": 0.3, "feature": 2.0}
    assert loss.item() == pytest.approx(sum(weights[n] * want[n] for n in terms), rel=1e-10)


def test_teacher_features_get_no_gradient_and_heads_do():
    obj = objective(ALL_TERMS)
    student = TinyStudent()
    x, teacher, targets = classification_batch()
    teacher.features[0].requires_grad_(True)
    loss, _ = obj(0, student(x), teacher, targets, targets.counts(per_token=False))
    loss.backward()
    assert teacher.features[0].grad is None
    assert obj.heads[0].weight.grad is not None and obj.heads[0].weight.grad.abs().sum() > 0


def test_no_teacher_needed_for_a_supervised_plan():
    obj = Objective([Phase("supervised", 0, 5, ("ce",))], total_steps=5, ce_weight=1.0)
    assert not obj.needs_teacher
    x, _, targets = classification_batch()
    out = TinyStudent()(x)
    loss, parts = obj(3, out, None, targets, targets.counts(per_token=False))
    assert set(parts) == {"ce"}
    assert loss.item() == pytest.approx(ref_ce_mean(out.logits, targets.labels), rel=1e-10)


def test_counts():
    labels = torch.tensor([[IGNORE_INDEX, 3, 4], [1, IGNORE_INDEX, IGNORE_INDEX]])
    kd_mask = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    targets = Targets(labels=labels, kd_mask=kd_mask)
    assert targets.counts(per_token=True) == {"kd": 4, "ce": 3, "feature": 4}
    assert targets.counts(per_token=False) == {"kd": 4, "ce": 3, "feature": 2}
    assert add_counts({}, {"kd": 4, "ce": 3}) == {"kd": 4, "ce": 3}
    assert add_counts({"kd": 4, "ce": 3, "feature": 2}, {"kd": 1, "ce": 0, "feature": 5}) == {
        "kd": 5,
        "ce": 3,
        "feature": 7,
    }


# ---------------------------------------------------------------- gradient accumulation


def params_of(student, obj):
    return list(student.parameters()) + list(obj.parameters())


def grads_of(student, obj):
    """Gradients (None for parameters that the active terms do not use)."""
    return [None if p.grad is None else p.grad.clone() for p in params_of(student, obj)]


def assert_same_grads(got, want):
    assert [g is None for g in got] == [g is None for g in want]
    assert any(g is not None for g in want)
    for g_got, g_want in zip(got, want):
        if g_want is not None:
            torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-13)


def full_step(student, obj, step, x, teacher, targets, per_token):
    for p in params_of(student, obj):
        p.grad = None
    loss, parts = obj(step, student(x), teacher, targets, targets.counts(per_token))
    loss.backward()
    return loss.item(), {k: v.item() for k, v in parts.items()}, grads_of(student, obj)


def accumulated_step(student, obj, step, micro, per_token):
    """micro: list of (x, teacher, targets); each micro loss is normalised by the whole step's rows."""
    for p in params_of(student, obj):
        p.grad = None
    rows: dict[str, int] = {}
    for _x, _teacher, targets in micro:
        rows = add_counts(rows, targets.counts(per_token))
    total, parts_total = 0.0, {}
    for x, teacher, targets in micro:
        loss, parts = obj(step, student(x), teacher, targets, rows)
        loss.backward()
        total += loss.item()
        for k, v in parts.items():
            parts_total[k] = parts_total.get(k, 0.0) + v.item()
    return total, parts_total, grads_of(student, obj)


def split(x, teacher, targets, bounds):
    out = []
    for a, b in bounds:
        out.append(
            (
                x[a:b],
                Outputs(logits=teacher.logits[a:b], features=[f[a:b] for f in teacher.features]),
                Targets(labels=targets.labels[a:b], kd_mask=targets.kd_mask[a:b]),
            )
        )
    return out


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize(
    "default_plan, step", [(False, 1), (True, 1), (True, 4), (True, 8)], ids=["all", "feature", "kd", "kd+ce"]
)
def test_grad_accumulation_equals_one_batch_classification(divergence, default_plan, step):
    plan = phase_boundaries(DEFAULT_PHASES, 10) if default_plan else ALL_TERMS
    obj = objective(plan, divergence=divergence)
    student = TinyStudent()
    x, teacher, targets = classification_batch()
    # Uneven micro-batches; labels ignored 1 of 3, 1 of 1 (no labeled row at all), 1 of 4.
    bounds = [(0, 3), (3, 4), (4, 8)]
    loss, parts, grads = full_step(student, obj, step, x, teacher, targets, per_token=False)
    micro_loss, micro_parts, micro_grads = accumulated_step(
        student, obj, step, split(x, teacher, targets, bounds), False
    )
    assert micro_loss == pytest.approx(loss, rel=1e-12)
    assert micro_parts == pytest.approx(parts, rel=1e-12)
    assert_same_grads(micro_grads, grads)


def naive_accumulated_loss(student, obj, step, micro, per_token):
    """What goes wrong without whole-step counts: the mean of per-micro-batch means."""
    total = 0.0
    for x, teacher, targets in micro:
        loss, _ = obj(step, student(x), teacher, targets, targets.counts(per_token))
        total += loss.item() / len(micro)
    return total


def test_the_accumulation_check_is_sensitive():
    # Per-micro-batch normalisation gives a different loss on the same data: the equality above is not trivial.
    obj = objective(phase_boundaries(DEFAULT_PHASES, 10))
    student = TinyStudent()
    x, teacher, targets = classification_batch()
    loss, _, _ = full_step(student, obj, 8, x, teacher, targets, per_token=False)
    naive = naive_accumulated_loss(student, obj, 8, split(x, teacher, targets, [(0, 3), (3, 4), (4, 8)]), False)
    assert abs(naive - loss) > 1e-3


def sequence_batch(seed=10):
    batch, length = 3, 5
    x = seeded(batch, length, 5, seed=seed)
    # Real tokens: row 0 all five, row 1 two (right padding), row 2 four (left padding).
    kd_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    # Hard labels only on completion tokens: prompt tokens and padding are IGNORE_INDEX.
    labels = torch.tensor(
        [
            [IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1],
            [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
            [IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX],
        ]
    )
    teacher_logits = seeded(batch, length, 7, seed=seed + 1) * 2
    # Garbage in the teacher's padded positions must not matter.
    teacher_logits[~kd_mask] = 1e3 * seeded(int((~kd_mask).sum()), 7, seed=seed + 4)
    teacher = Outputs(
        logits=teacher_logits,
        features=[seeded(batch, length, 6, seed=seed + 2), seeded(batch, length, 4, seed=seed + 3)],
    )
    return x, teacher, Targets(labels=labels, kd_mask=kd_mask)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("bounds", [[(0, 1), (1, 3)], [(0, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)]])
def test_grad_accumulation_equals_one_batch_per_token(divergence, bounds):
    obj = objective(ALL_TERMS, per_token=True, divergence=divergence)
    student = TinyStudent(num_classes=7)
    x, teacher, targets = sequence_batch()
    loss, parts, grads = full_step(student, obj, 3, x, teacher, targets, per_token=True)
    assert set(parts) == {"kd", "ce", "feature"}
    assert all(math.isfinite(v) for v in parts.values())
    micro_loss, micro_parts, micro_grads = accumulated_step(student, obj, 3, split(x, teacher, targets, bounds), True)
    assert micro_loss == pytest.approx(loss, rel=1e-12)
    assert micro_parts == pytest.approx(parts, rel=1e-12)
    assert_same_grads(micro_grads, grads)
    naive = naive_accumulated_loss(student, obj, 3, split(x, teacher, targets, bounds), True)
    assert abs(naive - loss) > 1e-3


def test_per_token_parts_are_means_over_real_tokens():
    obj = objective(ALL_TERMS, per_token=True)
    student = TinyStudent(num_classes=7)
    x, teacher, targets = sequence_batch()
    out = student(x)
    _, parts = obj(0, out, teacher, targets, targets.counts(per_token=True))
    mask = targets.kd_mask
    assert parts["kd"].item() == pytest.approx(ref_kd_mean(out.logits, teacher.logits, 2.0, mask=mask), rel=1e-10)
    assert parts["ce"].item() == pytest.approx(ref_ce_mean(out.logits, targets.labels), rel=1e-10)
    # Feature term: per real token, over rows of (B*T, D).
    rows = mask.reshape(-1)
    projected = obj.heads[0](out.features[0]).reshape(-1, 6)[rows]
    first = ref_unit_sq_dist_mean(projected, teacher.features[0].reshape(-1, 6)[rows])
    second = ref_unit_sq_dist_mean(out.features[1].reshape(-1, 4)[rows], teacher.features[1].reshape(-1, 4)[rows])
    assert parts["feature"].item() == pytest.approx(1.0 * first + 0.5 * second, rel=1e-10)
