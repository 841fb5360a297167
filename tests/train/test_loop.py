"""The training loop: bit-exact resume, the NaN guard, gradient accumulation, metrics rows."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from distilflow.config import KDWeightConfig, PhaseConfig, TrainConfig
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX, Objective
from distilflow.models.heads import build_head
from distilflow.models.taps import Taps
from distilflow.models.zoo import CNN, MLP
from distilflow.schedules import Phase, phase_boundaries
from distilflow.tasks.classify import ClassifierTask
from distilflow.teachers.live import LiveTeacher
from distilflow.train.checkpoint import CHECKPOINT, digest, read_checkpoint
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import NonFiniteLoss, fit

WIDTH, CLASSES = 24, 3
STEPS = 8
# 2 feature steps, 4 kd steps, 2 kd + ce steps; the kill and the checkpoint fall inside the kd phase.
PHASES = [
    PhaseConfig(name="feature_alignment", fraction=0.25, terms=["feature"]),
    PhaseConfig(name="soft_label_pretrain", fraction=0.5, terms=["kd"]),
    PhaseConfig(name="joint_optimization", fraction=0.25, terms=["kd", "ce"]),
]
CE_WEIGHT, FEATURE_WEIGHT = 0.3, 0.5
KD = KDWeightConfig(schedule="cosine", base_weight=0.7, warmup_steps=3, min_weight=0.1)
PAIRS = [("layers.3", "pool", 1.0), ("layers.1", "features.2", 0.5)]  # vector->vector, vector->conv map


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, WIDTH, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    y[::5] = IGNORE_INDEX  # unlabeled transfer samples, spread over the batches
    return x, y


def _task(x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8, grad_accum: int = 2) -> ClassifierTask:
    test_x, test_y = _data(16, seed=1)
    test_y = test_y.clamp(min=0)
    return ClassifierTask(
        x,
        y,
        test_x=test_x,
        test_y=test_y,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=5,
        device=torch.device("cpu"),
    )


class Killed(Exception):
    """Stands in for SIGKILL: the process dies at the start of a step."""


class KillAt:
    """The task, except that ``micro_batches`` dies at ``step`` (and any later step)."""

    def __init__(self, task: ClassifierTask, step: int) -> None:
        self.task, self.step = task, step

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def micro_batches(self, step: int):
        if step >= self.step:
            raise Killed(step)
        return self.task.micro_batches(step)


@dataclass
class Distillation:
    student: nn.Module
    objective: Objective
    teacher: LiveTeacher
    student_taps: Taps
    task: ClassifierTask


def _teacher_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    teacher = CNN((WIDTH,), CLASSES, [4, 4], kernel_size=3)
    # Non-trivial BatchNorm statistics, as a trained teacher would have.
    teacher.train()
    with torch.no_grad():
        teacher(torch.randn(32, WIDTH) * 2 + 0.5)
    return teacher.state_dict()


TEACHER_STATE = _teacher_state()


def _distillation() -> Distillation:
    """New objects, as a fresh process would build them (same seeds as the pipeline)."""
    teacher = CNN((WIDTH,), CLASSES, [4, 4], kernel_size=3)
    teacher.load_state_dict(TEACHER_STATE)
    torch.manual_seed(0)
    student = MLP((WIDTH,), CLASSES, [16, 16], dropout=0.3)  # dropout: the RNG state matters
    student_taps = Taps(student, [p[0] for p in PAIRS], "student")
    teacher_taps = Taps(teacher, [p[1] for p in PAIRS], "teacher")
    probe = torch.randn(2, WIDTH)
    teacher.eval()
    with torch.no_grad(), student_taps.capture(), teacher_taps.capture():
        student(probe)
        teacher(probe)
    heads = nn.ModuleList(
        build_head(tuple(s.shape[1:]), tuple(t.shape[1:]), per_token=False, name=f"{a} -> {b}")
        for (a, b, _), s, t in zip(PAIRS, student_taps.features(), teacher_taps.features())
    )
    objective = Objective(
        phase_boundaries(PHASES, STEPS),
        total_steps=STEPS,
        kd_schedule=KD,
        temperature=2.0,
        ce_weight=CE_WEIGHT,
        feature_weight=FEATURE_WEIGHT,
        layer_weights=[p[2] for p in PAIRS],
        heads=heads,
    )
    task = _task(*_data())
    return Distillation(student, objective, LiveTeacher(teacher, task, teacher_taps), student_taps, task)


TRAIN = TrainConfig(
    steps=STEPS,
    batch_size=8,
    grad_accum=2,
    lr=1e-2,
    min_lr=1e-3,
    warmup_steps=2,
    eval_every=3,
    log_every=1,
    checkpoint_every=4,
)


def _fit(d: Distillation, run_dir: Path, task=None) -> None:
    log = MetricsLog(run_dir, "student", tensorboard=False)
    try:
        fit(
            stage="student",
            model=d.student,
            objective=d.objective,
            task=task or d.task,
            train=TRAIN,
            stage_dir=run_dir / "student",
            log=log,
            config={"test": True},
            teacher=d.teacher,
            student_taps=d.student_taps,
        )
    finally:
        log.close()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "samples_per_s"} for row in rows]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, Distillation]:
    """The reference: STEPS steps in one go."""
    run_dir = tmp_path_factory.mktemp("straight")
    d = _distillation()
    _fit(d, run_dir)
    return run_dir, d


def test_resume_after_a_kill_is_bit_exact(straight, tmp_path):
    ref_dir, ref = straight
    # Killed at the start of step 7 (0-based 6): the checkpoint is at step 4, and steps 5 and 6 were
    # already logged; an evaluation row at step 6 too. The restart must forget them and redo them.
    first = _distillation()
    with pytest.raises(Killed):
        _fit(first, tmp_path, task=KillAt(first.task, 6))
    assert read_checkpoint(tmp_path / "student" / CHECKPOINT)["step"] == 4
    assert max(row["step"] for row in _rows(tmp_path)) == 6

    torch.manual_seed(12345)  # a new process has another global RNG state
    second = _distillation()
    torch.manual_seed(54321)
    _fit(second, tmp_path)

    for name, value in ref.student.state_dict().items():
        assert torch.equal(second.student.state_dict()[name], value), name
    for name, value in ref.objective.heads.state_dict().items():
        assert torch.equal(second.objective.heads.state_dict()[name], value), name
    assert read_checkpoint(tmp_path / "student" / CHECKPOINT)["step"] == STEPS
    assert _comparable(_rows(tmp_path)) == _comparable(_rows(ref_dir))


def test_resume_without_the_rng_state_would_differ(straight, tmp_path):
    # Guards the test above: dropout draws depend on the RNG, so a restore that skipped it
    # (or skipped the optimizer) could not pass. Resuming from a checkpoint whose RNG state was
    # replaced must give other weights.
    _, ref = straight
    first = _distillation()
    with pytest.raises(Killed):
        _fit(first, tmp_path, task=KillAt(first.task, 4))
    path = tmp_path / "student" / CHECKPOINT
    state = torch.load(path, weights_only=True)
    state["rng"]["torch"] = torch.Generator().manual_seed(999).get_state()
    state["digest"] = digest(state)  # a consistent checkpoint, not a damaged one
    torch.save(state, path)
    second = _distillation()
    _fit(second, tmp_path)
    assert not all(torch.equal(second.student.state_dict()[k], v) for k, v in ref.student.state_dict().items())


def test_a_finished_stage_is_not_trained_again(straight):
    ref_dir, ref = straight
    rows = (ref_dir / "metrics.jsonl").read_text()
    again = _distillation()
    _fit(again, ref_dir, task=KillAt(again.task, 0))  # would die on any step it ran
    for name, value in ref.student.state_dict().items():
        assert torch.equal(again.student.state_dict()[name], value), name
    assert (ref_dir / "metrics.jsonl").read_text() == rows


def test_metrics_rows_hold_stage_step_phase_loss_and_parts(straight):
    ref_dir, _ = straight
    rows = _rows(ref_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in eval_rows] == [3, 6, STEPS]
    plan = phase_boundaries(PHASES, STEPS)
    for row in train_rows:
        phase = next(p for p in plan if p.start <= row["step"] - 1 < p.end)
        assert row["stage"] == "student"
        assert row["phase"] == phase.name
        parts = {k: row[k] for k in ("kd", "ce", "feature") if k in row}
        assert set(parts) == set(phase.terms)
        assert all(math.isfinite(v) and v >= 0 for v in parts.values())
        # The logged total is the weighted sum of the logged parts.
        weights = {"kd": row["kd_weight"], "ce": CE_WEIGHT, "feature": FEATURE_WEIGHT}
        assert row["loss"] == pytest.approx(sum(weights[k] * v for k, v in parts.items()), rel=1e-5)
        assert row["lr"] > 0 and row["grad_norm"] >= 0
    assert {r["phase"] for r in train_rows} == {p.name for p in plan}
    for row in eval_rows:
        assert row["stage"] == "student" and 0 <= row["eval_accuracy"] <= 1


class PoisonAt:
    """The task, except that from ``step`` on the inputs are inf (the loss becomes NaN)."""

    def __init__(self, task: ClassifierTask, step: int, checkpoint: Path) -> None:
        self.task, self.step, self.checkpoint = task, step, checkpoint
        self.bytes_before: bytes | None = None

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def micro_batches(self, step: int):
        batches = self.task.micro_batches(step)
        if step >= self.step:
            if self.bytes_before is None and self.checkpoint.is_file():
                self.bytes_before = self.checkpoint.read_bytes()
            batches = [{"x": b["x"] * math.inf, "y": b["y"]} for b in batches]
        return batches


def _supervised(steps: int) -> Objective:
    return Objective([Phase("supervised", 0, steps, ("ce",))], total_steps=steps, ce_weight=1.0)


def test_nan_loss_stops_with_a_user_error_and_keeps_the_checkpoint(tmp_path):
    x, y = _data()
    torch.manual_seed(0)
    model = MLP((WIDTH,), CLASSES, [16])
    # max_bad_steps 1: the first bad step stops (tests/train/test_bad_steps.py: skipping and counting).
    train = TrainConfig(
        steps=6, batch_size=8, lr=1e-2, warmup_steps=0, checkpoint_every=2, log_every=1, max_bad_steps=1
    )
    ckpt = tmp_path / "baseline" / CHECKPOINT
    task = PoisonAt(_task(x, y, grad_accum=1), 3, ckpt)
    log = MetricsLog(tmp_path, "baseline", tensorboard=False)
    with pytest.raises(NonFiniteLoss) as info:
        fit(
            stage="baseline",
            model=model,
            objective=_supervised(6),
            task=task,
            train=train,
            stage_dir=tmp_path / "baseline",
            log=log,
            config={},
        )
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert "baseline step 4" in message and "nan" in message and str(ckpt) in message
    assert ckpt.read_bytes() == task.bytes_before
    state = read_checkpoint(ckpt)
    assert state["step"] == 2
    fresh = MLP((WIDTH,), CLASSES, [16])
    fresh.load_state_dict(state["model"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert all(row["step"] <= 3 for row in _rows(tmp_path))


def test_nan_before_any_checkpoint_says_so(tmp_path):
    x, y = _data()
    model = MLP((WIDTH,), CLASSES, [16])
    train = TrainConfig(steps=4, batch_size=8, warmup_steps=0, checkpoint_every=0, max_bad_steps=1)
    with pytest.raises(NonFiniteLoss, match="teacher step 1: loss is nan.*no checkpoint was written yet"):
        fit(
            stage="teacher",
            model=model,
            objective=_supervised(4),
            task=PoisonAt(_task(x, y, grad_accum=1), 0, tmp_path / "x"),
            train=train,
            stage_dir=tmp_path / "teacher",
            log=MetricsLog(tmp_path, "teacher", tensorboard=False),
            config={},
        )
    assert not (tmp_path / "teacher" / CHECKPOINT).exists()


def _supervised_run(tmp_path: Path, grad_accum: int) -> tuple[nn.Module, list[dict]]:
    x, y = _data()
    torch.manual_seed(0)
    model = MLP((WIDTH,), CLASSES, [16, 16])
    train = TrainConfig(
        steps=4, batch_size=8, grad_accum=grad_accum, lr=1e-2, warmup_steps=0, log_every=1, grad_clip=1.0
    )
    run_dir = tmp_path / f"accum{grad_accum}"
    run_dir.mkdir()
    fit(
        stage="baseline",
        model=model,
        objective=_supervised(4),
        task=_task(x, y, batch_size=8, grad_accum=grad_accum),
        train=train,
        stage_dir=run_dir / "baseline",
        log=MetricsLog(run_dir, "baseline", tensorboard=False),
        config={},
    )
    return model, [r for r in _rows(run_dir) if "loss" in r]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # Labels are -100 on every 5th sample, so the micro-batches hold different numbers of labeled
    # samples: a per-micro-batch mean would weight them wrongly. Loss and gradient norm are logged
    # before AdamW (which is blind to a constant gradient scale), so they catch a scale error too.
    one, rows_one = _supervised_run(tmp_path, 1)
    two, rows_two = _supervised_run(tmp_path, 2)
    four, rows_four = _supervised_run(tmp_path, 4)
    for model, rows in ((two, rows_two), (four, rows_four)):
        for name, value in one.state_dict().items():
            torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
        for a, b in zip(rows_one, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert len(rows_one) == len(rows_two) == 4
    assert not torch.equal(one.layers[0].weight, _fresh_mlp().layers[0].weight)  # it did train


def _fresh_mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((WIDTH,), CLASSES, [16, 16])


def test_teacher_terms_without_a_teacher_are_refused(tmp_path):
    d = _distillation()
    with pytest.raises(UserError, match="no teacher"):
        fit(
            stage="student",
            model=d.student,
            objective=d.objective,
            task=d.task,
            train=TRAIN,
            stage_dir=tmp_path,
            log=MetricsLog(tmp_path, "student", tensorboard=False),
            config={},
        )
