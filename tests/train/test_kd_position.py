"""The input-adaptive KD weight in the loop (train/kd_position.py): weights of a step against numpy, the
teacher run once per micro-batch and before the first backward, gradient accumulation exact, the
logged distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distilflow.config import KDWeightConfig, TrainConfig
from distilflow.losses.adaptive import AdaptiveKD
from distilflow.losses.objective import IGNORE_INDEX, Objective, Outputs, Targets
from distilflow.models.zoo import MLP
from distilflow.schedules import Phase
from distilflow.tasks.classify import ClassifierTask
from distilflow.teachers.live import LiveTeacher
from distilflow.train import dist
from distilflow.train.kd_position import PositionWeights
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit


def np_softmax(row):
    e = np.exp(row - row.max())
    return e / e.sum()


def lm_micro_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for b in (2, 3):
        logits = 2.0 * torch.randn(b, 4, 6, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 6, (b, 4), generator=g)
        labels[0, :2] = IGNORE_INDEX  # a prompt: KD counts there, no label
        mask = torch.ones(b, 4, dtype=torch.bool)
        mask[-1, 3] = False  # padding
        labels[~mask] = IGNORE_INDEX
        out.append((Outputs(logits), Targets(labels=labels, kd_mask=mask)))
    return out


def test_weights_of_a_step_match_numpy_and_the_summary_their_percentiles():
    settings = AdaptiveKD(source="correctness", prefer="confident", tau=0.8)
    weights = PositionWeights(settings, vocab_size=6)
    parts = lm_micro_batches()
    got = weights.weigh([o for o, _ in parts], [t for _, t in parts], per_token=True, world=dist.World())
    raw, where = [], []
    for i, (output, target) in enumerate(parts):
        for index in np.ndindex(*target.kd_mask.shape):
            if not target.kd_mask[index]:
                continue
            p = np_softmax(output.logits[index].numpy())
            label = int(target.labels[index])
            score = -math.log(p[label]) if label != IGNORE_INDEX else float(-(p * np.log(p)).sum())
            raw.append(math.exp(-score / 0.8))
            where.append((i, index))
    want = np.array(raw) * len(raw) / sum(raw)
    values = np.array([float(got[i].kd_weight[index]) for i, index in where])
    np.testing.assert_allclose(values, want, rtol=1e-6)
    assert all(float(t.kd_weight[~t.kd_mask].abs().sum()) == 0.0 for t in got)
    assert all(t.kd_mask.dtype == torch.bool for t in got)  # the boolean mask is kept for counts and features
    stats = weights.summary(dist.World())
    assert stats["kd_position_weight_mean"] == pytest.approx(1.0, rel=1e-6)
    for name, q in (("p10", 10), ("p50", 50), ("p90", 90)):
        assert stats[f"kd_position_weight_{name}"] == pytest.approx(float(np.percentile(want, q)), rel=1e-5)
    assert stats["kd_position_weight_min"] == pytest.approx(want.min(), rel=1e-5)


class Recording(LiveTeacher):
    """A live teacher that records its calls into ``events``."""

    def __init__(self, model, task, events):
        super().__init__(model, task, None)
        self.events = events

    def __call__(self, batch, *, features):
        self.events.append("teacher")
        return super().__call__(batch, features=features)


def train(tmp_path, *, grad_accum, adaptive, events=None):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(48, 12, generator=g), torch.randint(0, 4, (48,), generator=g)
    y[::3] = IGNORE_INDEX
    task = ClassifierTask(
        x,
        y,
        test_x=x[:8],
        test_y=y[:8].clamp(min=0),
        batch_size=12,
        grad_accum=grad_accum,
        seed=1,
        device=torch.device("cpu"),
    )
    torch.manual_seed(7)
    teacher = MLP((12,), 4, [16], dropout=0.0)
    torch.manual_seed(0)
    student = MLP((12,), 4, [8], dropout=0.0)
    events = [] if events is None else events
    student.layers[0].weight.register_hook(lambda grad: events.append("backward"))
    objective = Objective(
        [Phase("kd", 0, 2, ("kd",)), Phase("kd+ce", 2, 4, ("kd", "ce"))],
        total_steps=4,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7, warmup_steps=0),
        temperature=2.0,
        ce_weight=0.3,
    )
    run_dir = tmp_path / f"run-{grad_accum}-{adaptive}"
    run_dir.mkdir()
    log = MetricsLog(run_dir, "student", tensorboard=False)
    settings = AdaptiveKD(source="correctness", tau=0.5) if adaptive else None
    fit(
        stage="student",
        model=student,
        objective=objective,
        task=task,
        train=TrainConfig(
            steps=4, batch_size=12, grad_accum=grad_accum, lr=1e-2, warmup_steps=0, log_every=1, eval_every=0
        ),
        stage_dir=run_dir / "student",
        log=log,
        config={},
        teacher=Recording(teacher, task, events),
        kd_position=PositionWeights(settings, vocab_size=4) if settings else None,
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [p.detach().clone() for p in student.parameters()]


def test_the_teacher_runs_once_per_micro_batch_and_before_the_first_backward(tmp_path):
    events: list[str] = []
    train(tmp_path, grad_accum=3, adaptive=True, events=events)
    # 4 steps of 3 micro-batches: the 3 teacher calls of a step all come before its first backward.
    assert events == (["teacher"] * 3 + ["backward"] * 3) * 4


def test_gradient_accumulation_gives_the_one_batch_run_and_the_weights_are_logged(tmp_path):
    one, one_params = train(tmp_path, grad_accum=1, adaptive=True)
    three, three_params = train(tmp_path, grad_accum=3, adaptive=True)
    for a, b in zip(one, three):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["kd_position_weight_p50"] == pytest.approx(b["kd_position_weight_p50"], rel=1e-5)
        assert a["kd_position_weight_mean"] == pytest.approx(1.0, rel=1e-6)
        assert a["kd_position_weight_max"] > 1.05 > 0.95 > a["kd_position_weight_min"]  # really adaptive
    for a, b in zip(one_params, three_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain, _ = train(tmp_path, grad_accum=3, adaptive=False)
    assert abs(plain[0]["loss"] - three[0]["loss"]) > 1e-4  # the weight changes the loss
    assert not any(k.startswith("kd_position_weight_") for k in plain[0])


def test_a_classifier_weight_is_per_sample_and_multiplies_the_kd_mask():
    target = Targets(labels=torch.tensor([1, IGNORE_INDEX]), kd_mask=torch.ones(2, dtype=torch.bool))
    assert target.kd_rows(per_token=False) is None
    weighted = Targets(labels=target.labels, kd_mask=target.kd_mask, kd_weight=torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(weighted.kd_rows(per_token=False), torch.tensor([0.5, 1.5]))
    lm = Targets(
        labels=torch.zeros(1, 3, dtype=torch.long),
        kd_mask=torch.tensor([[True, False, True]]),
        kd_weight=torch.tensor([[2.0, 7.0, 0.5]]),
    )
    torch.testing.assert_close(lm.kd_rows(per_token=True), torch.tensor([[2.0, 0.0, 0.5]]))
    assert lm.counts(per_token=True)["kd"] == 2  # the row count is the boolean one
