"""The Diagnosis: each rule on a small run made to show it, and a healthy run that shows none.

Runs are real (the training loop, or 'distilflow run' in-process on a tiny MNIST-1D); the rules read
only what the run wrote (metrics.jsonl, results.json, config.yaml), as 'distilflow diagnose' does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distilflow.cli import main
from distilflow.config import PhaseConfig, TrainConfig
from distilflow.deploy.bench import teacher_student_latency
from distilflow.diagnose import diagnose, diagnose_run, read_metrics, speed_rule
from distilflow.losses.objective import Objective
from distilflow.models.build import count_macs
from distilflow.models.zoo import MLP
from distilflow.schedules import phase_boundaries
from distilflow.tasks.classify import ClassifierTask
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit

WIDTH = 8


def _easy_task(*, n: int = 256, seed: int = 0) -> ClassifierTask:
    """Two classes split by the sign of the first feature: an MLP learns it in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    x, test_x = torch.randn(n, WIDTH, generator=g), torch.randn(128, WIDTH, generator=g)
    return ClassifierTask(
        x,
        (x[:, 0] > 0).long(),
        test_x=test_x,
        test_y=(test_x[:, 0] > 0).long(),
        batch_size=32,
        grad_accum=1,
        seed=3,
        device=torch.device("cpu"),
    )


class FlippedLabels:
    """The task, except that the labels of the steps in ``steps`` are flipped (a bad batch / a data bug)."""

    def __init__(self, task: ClassifierTask, steps: range) -> None:
        self.task, self.steps = task, steps

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def micro_batches(self, step: int):
        batches = self.task.micro_batches(step)
        if step in self.steps:
            batches = [{**b, "y": 1 - b["y"]} for b in batches]
        return batches


def _supervised(run_dir: Path, task, *, steps: int, lr: float, grad_clip: float, eval_every: int = 0) -> dict:
    """Train an MLP on ``task`` as the 'baseline' stage; the config a run folder would hold for it."""
    torch.manual_seed(0)
    model = MLP((WIDTH,), 2, [16])
    objective = Objective(
        phase_boundaries([PhaseConfig(name="supervised", fraction=1.0, terms=["ce"])], steps),
        total_steps=steps,
        ce_weight=1.0,
    )
    train = TrainConfig(
        steps=steps,
        batch_size=32,
        lr=lr,
        min_lr=lr,
        warmup_steps=0,
        grad_clip=grad_clip,
        eval_every=eval_every,
        log_every=1,
        checkpoint_every=0,
    )
    log = MetricsLog(run_dir, "baseline", tensorboard=False)
    try:
        fit(
            stage="baseline",
            model=model,
            objective=objective,
            task=task,
            train=train,
            stage_dir=run_dir / "baseline",
            log=log,
            config={},
        )
    finally:
        log.close()
    return {"student": {"train": {"grad_clip": grad_clip, "lr": lr, "warmup_steps": 0}}}


def _rules(diagnosis) -> list[str]:
    return [f.rule for f in diagnosis.findings]


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_bad_batch_is_a_loss_spike_and_the_advice_depends_on_clipping(tmp_path, grad_clip):
    config = _supervised(tmp_path, FlippedLabels(_easy_task(), range(40, 41)), steps=50, lr=0.02, grad_clip=grad_clip)
    rows = read_metrics(tmp_path)
    spikes = [r for r in rows if "spike_loss" in r]
    assert [r["step"] for r in spikes] == [41]  # 1-based, as every metrics row; one bad step of 50
    assert spikes[0]["spike_loss"] > 3 * spikes[0]["spike_median"]
    (finding,) = diagnose(rows, {}, config).findings
    assert finding.rule == "loss_spikes" and finding.values["steps"] == [41]
    if grad_clip == 0:
        assert "set student.train.grad_clip: 1.0" in finding.advice
    else:
        assert "lower student.train.lr" in finding.advice and "warmup_steps" in finding.advice

    # The same run without the bad batch: no spike, nothing to say.
    clean = tmp_path / "clean"
    clean.mkdir()
    config = _supervised(clean, _easy_task(), steps=50, lr=0.02, grad_clip=grad_clip)
    assert diagnose(read_metrics(clean), {}, config).findings == []


def test_held_out_accuracy_falling_from_its_best_is_not_converging(tmp_path):
    # The labels flip for the last 30 of 60 steps: held-out accuracy falls from its best.
    config = _supervised(
        tmp_path, FlippedLabels(_easy_task(), range(30, 60)), steps=60, lr=0.02, grad_clip=1.0, eval_every=10
    )
    evals = [r["eval_accuracy"] for r in read_metrics(tmp_path) if "eval_accuracy" in r]
    assert max(evals) > 0.85 and evals[-1] < 0.5
    findings = {f.rule: f for f in diagnose(read_metrics(tmp_path), {}, config).findings}
    assert findings["eval_not_converging"].values["best_step"] == 30
    assert "stop near step 30" in findings["eval_not_converging"].advice


# --- 'distilflow run' on a small npz problem -------------------------------------------------------


@pytest.fixture(scope="session")
def noisy_labels(tmp_path_factory) -> Path:
    """4 classes from a linear map of 16 features; 40% of the 800 training labels drawn at random
    (clean test split of 400, 2,000 unlabeled transfer rows): a teacher learns it in 100 steps."""
    folder = tmp_path_factory.mktemp("noisy-labels")
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(16, 4))

    def make(n: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 16)).astype(np.float32)
        y = (x @ weight).argmax(1)
        flip = rng.random(n) < noise
        y[flip] = rng.integers(0, 4, int(flip.sum()))
        return x, y

    for name, n, noise in [("train", 800, 0.4), ("test", 400, 0.0)]:
        x, y = make(n, noise)
        np.savez(folder / f"{name}.npz", x=x, y=y)
    np.savez(folder / "transfer.npz", x=make(2000, 0.0)[0])
    return folder


def _run(root: Path, data: Path, *extra: str) -> Path:
    """MLP teacher (64 wide, 100 steps) -> MLP student (16 wide, 60 steps: 12 feature-phase steps,
    then 30 KD and 18 joint), every step logged, evaluated every 10: about 5 s."""
    run_dir = root / "run"
    args = [
        f"output_dir={run_dir}",
        "data.source=npz",
        "data.mnist1d=null",
        f"data.files.path={data / 'train.npz'}",
        f"data.files.test_path={data / 'test.npz'}",
        f"data.files.transfer_path={data / 'transfer.npz'}",
        "threads=1",
        "teacher.model.arch=mlp",
        "teacher.model.cnn=null",
        "teacher.model.mlp.hidden=[64]",
        "teacher.train.steps=100",
        "teacher.train.batch_size=64",
        "teacher.train.warmup_steps=5",
        "teacher.train.log_every=5",
        "teacher.train.lr=0.01",
        "student.model.mlp.hidden=[16]",
        "student.train.steps=60",
        "student.train.batch_size=64",
        "student.train.warmup_steps=5",
        "student.train.log_every=1",
        "student.train.eval_every=10",
        "student.train.lr=0.01",
        "distill.kd_weight.warmup_steps=5",
        "distill.feature_layers=null",
        "deploy.enabled=false",
        *extra,
    ]
    assert main(["run", *args, "--no-tensorboard"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, noisy_labels) -> Path:
    return _run(tmp_path_factory.mktemp("healthy"), noisy_labels)


def test_a_healthy_run_logs_the_signals_and_no_training_rule_fires(healthy, capsys):
    rows = read_metrics(healthy)
    student = [r for r in rows if r["stage"] == "student" and "loss" in r]
    feature_steps = [r for r in student if r["phase"] == "feature_alignment"]
    pair = "feature_cos/layers.1->layers.1"  # the default pair: both MLPs' last hidden layer
    assert len(feature_steps) == 12 and all(pair in r for r in feature_steps)
    assert all(0 <= r["agreement"] <= 1 for r in student if r["phase"] != "feature_alignment")
    assert all("grad_norm" in r for r in student)
    # The similarity the feature loss pulls up does rise; the student comes to follow the teacher.
    assert feature_steps[-1][pair] > feature_steps[0][pair] + 0.2
    assert student[-1]["agreement"] > 0.5

    results = json.loads((healthy / "results.json").read_text())
    rules = [f["rule"] for f in results["diagnosis"]["findings"]]
    # A short run's distilled student may or may not beat its baseline: that rule fires exactly when
    # it does not, on the run's own figures. No other rule fires.
    no_gain = results["student"]["accuracy"] <= results["baseline"]["accuracy"]
    assert rules == (["no_gain_over_baseline"] if no_gain else [])
    report = (healthy / "report.md").read_text()
    assert "## Diagnosis" in report and (healthy / "diagnostics.png").is_file()

    # 'distilflow diagnose' prints the report's section from the folder alone.
    capsys.readouterr()
    assert main(["diagnose", str(healthy)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("## Diagnosis") and printed in report


def test_diagnose_of_an_interrupted_run_reads_the_finished_stages(healthy, tmp_path):
    # As an interrupted run leaves it: no results.json, the student's metrics cut mid-line.
    folder = tmp_path / "cut"
    folder.mkdir()
    lines = (healthy / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    for stage in ("teacher", "baseline"):
        (folder / stage).mkdir()
        (folder / stage / "result.json").write_text((healthy / stage / "result.json").read_text())
    diagnosis = diagnose_run(folder)
    assert set(diagnosis.signals) == {"teacher", "baseline", "student"}
    assert diagnosis.signals["student"]["last_step"] == max(
        json.loads(line)["step"] for line in lines[:-3] if '"student"' in line
    )
    assert "no_gain_over_baseline" not in _rules(diagnosis)  # no distilled result yet to compare


@pytest.mark.parametrize("content", [None, "", "not json\n"])
def test_diagnose_of_a_folder_without_metrics_is_one_line(tmp_path, capsys, content):
    folder = tmp_path / "empty"
    if content is not None:
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(content)
    assert main(["diagnose", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and "metrics.jsonl" in err or "exist" in err


def test_a_student_that_cannot_learn_has_a_flat_feature_pair(tmp_path, noisy_labels):
    run_dir = _run(tmp_path, noisy_labels, "student.train.lr=1e-9", "student.train.min_lr=1e-9")
    findings = {f.rule: f for f in diagnose_run(run_dir).findings}
    flat = findings["flat_feature_pair"]
    assert flat.values["pair"] == "layers.1->layers.1" and abs(flat.values["gain"]) < 0.05
    assert "distill.feature_layers" in flat.advice and "feature phase more steps" in flat.advice


def test_a_kd_weight_near_zero_while_ce_stays_high(tmp_path, noisy_labels):
    # The KD weight 0.001 against CE 0.3, and a rate too low for CE to halve in 60 steps.
    run_dir = _run(tmp_path, noisy_labels, "distill.kd_weight.base_weight=0.001", "student.train.lr=1e-4")
    findings = {f.rule: f for f in diagnose_run(run_dir).findings}
    kd = findings["kd_near_zero"]
    assert kd.values["median"] < 0.01
    assert "raise distill.kd_weight.base_weight (now 0.001)" in kd.advice


def test_a_student_distilled_from_an_untrained_teacher_is_no_better_than_the_baseline(tmp_path, noisy_labels):
    # The teacher does not learn (lr 1e-9) and the student learns from it alone (KD only).
    run_dir = _run(
        tmp_path,
        noisy_labels,
        "teacher.train.lr=1e-9",
        "teacher.train.min_lr=1e-9",
        "distill.phases=[{name: kd_only, fraction: 1.0, terms: [kd]}]",
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["student"]["accuracy"] < results["baseline"]["accuracy"] - 0.2
    findings = {f["rule"]: f for f in results["diagnosis"]["findings"]}
    no_gain = findings["no_gain_over_baseline"]
    assert no_gain["values"]["student"] == results["student"]["accuracy"]
    assert "train a stronger teacher" in no_gain["advice"]  # the teacher is no better than the baseline


# --- speed ------------------------------------------------------------------------------------------


def _speed(teacher: nn.Module, student: nn.Module) -> dict:
    x = torch.randn(256, 64)
    speed = teacher_student_latency(
        teacher, student, {"x": x.numpy()}, kind="classifier", batch_sizes=[256], threads=1, iterations=10
    )
    macs = count_macs(student, x[:1]) / count_macs(teacher, x[:1])
    return {"student": {"macs_ratio_to_teacher": macs}, "speed": speed}


def test_a_deep_narrow_student_is_slower_than_its_macs_predict():
    # 1/300 of the teacher's MACs in 16 layers: eager per-layer overhead, not arithmetic, sets its time.
    teacher, student = MLP((64,), 10, [512, 512]).eval(), MLP((64,), 10, [4] * 16).eval()
    results = _speed(teacher, student)
    assert results["student"]["macs_ratio_to_teacher"] < 0.01
    (finding,) = speed_rule(results)
    assert finding.rule == "slower_than_macs" and finding.values["latency_ratio"] > 0.02
    assert "size-student" in finding.advice

    # A student as large as its teacher takes about its time: nothing to say.
    assert speed_rule(_speed(teacher, MLP((64,), 10, [512, 512]).eval())) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("diagnostics.spike_factor=1.0", "config key 'diagnostics.spike_factor': 1.0 is not allowed; must be > 1"),
        ("diagnostics.spike_window=3", "config key 'diagnostics.spike_window': 3 is not allowed; must be >= 6"),
    ],
)
def test_bad_diagnostics_settings_are_one_line(tmp_path, capsys, override, expected):
    assert main(["run", f"output_dir={tmp_path / 'run'}", override, "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distilflow: error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()
