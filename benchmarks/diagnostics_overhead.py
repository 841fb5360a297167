"""Issue 18: what the per-step diagnostics cost (train/diagnostics.py), side by side in one process.

    python benchmarks/diagnostics_overhead.py [--steps N] [--repeats R] [--threads T]

The MNIST-1D demo's shapes (CNN teacher 32x3 channels -> MLP student 192x2, batch 128, its feature
pair ``layers.3 -> pool``) distilled for ``--steps`` steps with the feature term and then KD + CE,
with the diagnostics on (agreement, per-pair cosine similarity on logged steps; the spike detector
on every step) and with ``StepWatch.observe`` replaced by a no-op (what the loop cost before them).
Both at ``log_every`` 1 (the worst case: every step logged, so every step measures) and 50 (the
demo's). The runs alternate on/off ``--repeats`` times so drift on a shared machine hits both alike;
the table gives the best CPU time (user + system of this process) of each and their ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from distilflow.config import KDWeightConfig, PhaseConfig, TrainConfig
from distilflow.losses.objective import Objective
from distilflow.models.heads import build_head
from distilflow.models.taps import Taps
from distilflow.models.zoo import CNN, MLP
from distilflow.schedules import phase_boundaries
from distilflow.tasks.classify import ClassifierTask
from distilflow.teachers.live import LiveTeacher
from distilflow.train import diagnostics
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import fit

LENGTH, CLASSES = 40, 10
PAIR = ("layers.3", "pool")
PHASES = [
    PhaseConfig(name="feature_alignment", fraction=0.5, terms=["feature"]),
    PhaseConfig(name="joint_optimization", fraction=0.5, terms=["kd", "ce"]),
]


def one_run(steps: int, log_every: int, folder: Path) -> float:
    """CPU seconds of one distillation of ``steps`` steps."""
    torch.manual_seed(0)
    x, y = torch.randn(4000, LENGTH), torch.randint(0, CLASSES, (4000,))
    task = ClassifierTask(
        x, y, test_x=x[:500], test_y=y[:500], batch_size=128, grad_accum=1, seed=0, device=torch.device("cpu")
    )
    teacher = CNN((LENGTH,), CLASSES, [32, 32, 32], kernel_size=5).eval()
    student = MLP((LENGTH,), CLASSES, [192, 192])
    student_taps, teacher_taps = Taps(student, [PAIR[0]], "student"), Taps(teacher, [PAIR[1]], "teacher")
    with torch.no_grad(), student_taps.capture(), teacher_taps.capture():
        student(x[:2])
        teacher(x[:2])
    (student_feature,), (teacher_feature,) = student_taps.features(), teacher_taps.features()
    heads = nn.ModuleList(
        [build_head(tuple(student_feature.shape[1:]), tuple(teacher_feature.shape[1:]), per_token=False, name="p")]
    )
    objective = Objective(
        phase_boundaries(PHASES, steps),
        total_steps=steps,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7),
        temperature=2.0,
        ce_weight=0.3,
        layer_weights=[1.0],
        heads=heads,
    )
    train = TrainConfig(steps=steps, batch_size=128, warmup_steps=10, log_every=log_every, checkpoint_every=0)
    log = MetricsLog(folder, "student", tensorboard=False)
    began = time.process_time()
    try:
        fit(
            stage="student",
            model=student,
            objective=objective,
            task=task,
            train=train,
            stage_dir=folder / "student",
            log=log,
            config={},
            teacher=LiveTeacher(teacher, task, teacher_taps),
            student_taps=student_taps,
        )
    finally:
        log.close()
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    real_observe = diagnostics.StepWatch.observe
    best: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for log_every in (1, 50):
                for mode in ("off", "on"):
                    diagnostics.StepWatch.observe = real_observe if mode == "on" else lambda *a, **k: None
                    folder = Path(tmp) / f"{repeat}-{log_every}-{mode}"
                    folder.mkdir()
                    seconds = one_run(args.steps, log_every, folder)
                    best[log_every, mode] = min(best.get((log_every, mode), float("inf")), seconds)
    diagnostics.StepWatch.observe = real_observe
    load = os.getloadavg()[0]
    print(f"{args.steps} steps, {args.threads} thread(s), best of {args.repeats}, load {load:.2f}")
    print("| log_every | CPU s, diagnostics off | CPU s, on | on / off |")
    print("|---|---|---|---|")
    for log_every in (1, 50):
        off, on = best[log_every, "off"], best[log_every, "on"]
        print(f"| {log_every} | {off:.2f} | {on:.2f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
