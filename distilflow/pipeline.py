"""Stages of a run: teacher, no-teacher baseline, distilled student, evaluation and results.

config -> data -> teacher (trained or loaded) -> baseline student -> distilled student through
the phases -> results.json and report.md. Each stage lives in ``<run_dir>/<stage>/`` with its
checkpoint and final weights; a finished stage is reused, an unfinished one resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distilflow.config import Config, StageConfig, config_from_dict, read_yaml, to_dict
from distilflow.data.classification import ClassificationData, load_classification
from distilflow.errors import UserError
from distilflow.losses.objective import Objective
from distilflow.models.build import build_model, count_macs, count_params, load_weights
from distilflow.models.heads import build_head
from distilflow.models.taps import Taps
from distilflow.schedules import Phase, phase_boundaries
from distilflow.tasks import ClassifierTask
from distilflow.train.checkpoint import HEADS, WEIGHTS, write_json, write_text, write_weights
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import FitResult, LiveTeacher, fit

STAGES = ("teacher", "baseline", "student")
RESULT = "result.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'device': {name!r} is not allowed; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key 'device': {name!r} is not available on this machine; use cpu or auto")
    return device


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix]


@dataclass
class Run:
    """Everything the stages share: config, data, device and output folder."""

    cfg: Config
    data: ClassificationData
    device: torch.device

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage


def open_run(cfg: Config) -> Run:
    """Check the output folder (same config or empty), load data, check the models, save the config.

    Everything that can fail on bad input runs before anything is written, so the corrected
    command can use the same output_dir.
    """
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    resolved = to_dict(cfg)
    if saved.is_file():
        diff = _differences(read_yaml(saved), resolved)
        if diff:
            raise UserError(
                f"output_dir '{run_dir}' holds a run with a different config (keys: {', '.join(diff[:6])}); "
                "choose another output_dir, or 'distilflow resume' it with its own config"
            )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, load_classification(cfg.data), resolve_device(cfg.device))
    preflight(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", resolved)
    write_text(saved, yaml.safe_dump(resolved, sort_keys=False))
    return run


def config_of_run(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a distilflow run folder (no config.yaml)")
    return config_from_dict(read_yaml(path))


def _new_model(run: Run, stage_cfg: StageConfig, role: str) -> nn.Module:
    torch.manual_seed(run.cfg.seed)
    return build_model(stage_cfg.model, run.data.input_shape, run.data.num_classes, role).to(run.device)


def _task(run: Run, stage_cfg: StageConfig, x: torch.Tensor, y: torch.Tensor, seed_offset: int) -> ClassifierTask:
    t = stage_cfg.train
    return ClassifierTask(
        x,
        y,
        test_x=run.data.test_x,
        test_y=run.data.test_y,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        seed=run.cfg.seed + seed_offset,
        device=run.device,
    )


def _supervised(total_steps: int) -> Objective:
    return Objective([Phase("supervised", 0, total_steps, ("ce",))], total_steps=total_steps, ce_weight=1.0)


def _finish(run: Run, stage: str, model: nn.Module, result: FitResult, heads: nn.Module | None = None) -> dict:
    stage_dir = run.stage_dir(stage)
    write_weights(stage_dir / WEIGHTS, model.state_dict(), {"stage": stage})
    if heads is not None and len(list(heads.parameters())):
        write_weights(stage_dir / HEADS, heads.state_dict(), {"stage": stage})
    summary = {**result.metrics, "steps": result.steps, "train_seconds": round(result.seconds, 2)}
    write_json(stage_dir / RESULT, summary)
    return summary


def _load_finished(run: Run, stage: str, model: nn.Module) -> dict | None:
    stage_dir = run.stage_dir(stage)
    if not (stage_dir / RESULT).is_file() or not (stage_dir / WEIGHTS).is_file():
        return None
    load_weights(model, stage_dir / WEIGHTS, stage)
    import json

    return json.loads((stage_dir / RESULT).read_text())


def teacher_stage(run: Run, log_tensorboard: bool = True) -> tuple[nn.Module, dict]:
    """The trained teacher: loaded from ``teacher.model.checkpoint``, reused, or trained now."""
    cfg = run.cfg
    model = _new_model(run, cfg.teacher, "teacher")
    if cfg.teacher.model.checkpoint:
        load_weights(model, cfg.teacher.model.checkpoint, "teacher")
        task = _task(run, cfg.teacher, run.data.train_x, run.data.train_y, 0)
        return model.eval(), {**task.evaluate(model), "steps": 0, "loaded_from": cfg.teacher.model.checkpoint}
    done = _load_finished(run, "teacher", model)
    if done is not None:
        return model.eval(), done
    task = _task(run, cfg.teacher, run.data.train_x, run.data.train_y, 0)
    log = MetricsLog(run.dir, "teacher", tensorboard=log_tensorboard)
    try:
        result = fit(
            stage="teacher",
            model=model,
            objective=_supervised(cfg.teacher.train.steps),
            task=task,
            train=cfg.teacher.train,
            stage_dir=run.stage_dir("teacher"),
            log=log,
            config=to_dict(cfg),
        )
    finally:
        log.close()
    return model.eval(), _finish(run, "teacher", model, result)


def _student_init(run: Run) -> nn.Module:
    model = _new_model(run, run.cfg.student, "student")
    if run.cfg.student.model.checkpoint:
        load_weights(model, run.cfg.student.model.checkpoint, "student")
    return model


def baseline_stage(run: Run, log_tensorboard: bool = True) -> tuple[nn.Module, dict]:
    """The student trained on labels alone, with the same steps and batch size as distillation."""
    model = _student_init(run)
    done = _load_finished(run, "baseline", model)
    if done is not None:
        return model.eval(), done
    task = _task(run, run.cfg.student, run.data.train_x, run.data.train_y, 1)
    log = MetricsLog(run.dir, "baseline", tensorboard=log_tensorboard)
    try:
        result = fit(
            stage="baseline",
            model=model,
            objective=_supervised(run.cfg.student.train.steps),
            task=task,
            train=run.cfg.student.train,
            stage_dir=run.stage_dir("baseline"),
            log=log,
            config=to_dict(run.cfg),
        )
    finally:
        log.close()
    return model.eval(), _finish(run, "baseline", model, result)


def build_heads(
    run: Run, student: nn.Module, teacher: nn.Module, student_taps: Taps, teacher_taps: Taps, probe: torch.Tensor
) -> nn.ModuleList:
    """One projection head per layer pair, sized from the shapes seen on a probe batch."""
    was_training = student.training
    student.eval()
    with torch.no_grad(), student_taps.capture(), teacher_taps.capture():
        student(probe)
        teacher(probe)
    student.train(was_training)
    s_feats, t_feats = student_taps.features(), teacher_taps.features()
    torch.manual_seed(run.cfg.seed + 2)
    heads = nn.ModuleList()
    for layer, s, t in zip(run.cfg.distill.feature_layers, s_feats, t_feats):
        name = f"student '{layer.student}' -> teacher '{layer.teacher}'"
        heads.append(build_head(tuple(s.shape[1:]), tuple(t.shape[1:]), per_token=False, name=name))
    return heads.to(run.device)


def _taps_and_heads(run: Run, student: nn.Module, teacher: nn.Module) -> tuple[Taps | None, Taps | None, nn.ModuleList]:
    pairs = run.cfg.distill.feature_layers
    if not pairs:
        return None, None, nn.ModuleList()
    student_taps = Taps(student, [p.student for p in pairs], "student")
    teacher_taps = Taps(teacher, [p.teacher for p in pairs], "teacher")
    heads = build_heads(run, student, teacher, student_taps, teacher_taps, run.data.train_x[:2].to(run.device))
    return student_taps, teacher_taps, heads


def preflight(run: Run) -> None:
    """Resolve feature layers and build heads on untrained models, so that a bad layer path or
    shapes no head can map fail before any training (shapes do not depend on the weights)."""
    teacher = _new_model(run, run.cfg.teacher, "teacher")
    _taps_and_heads(run, _new_model(run, run.cfg.student, "student"), teacher)


def distill_stage(run: Run, teacher: nn.Module, log_tensorboard: bool = True) -> tuple[nn.Module, dict]:
    """The student distilled from ``teacher`` through the configured phases."""
    cfg, d = run.cfg, run.cfg.distill
    model = _student_init(run)
    pairs = d.feature_layers
    student_taps, teacher_taps, heads = _taps_and_heads(run, model, teacher)
    done = _load_finished(run, "student", model)
    if done is not None:
        return model.eval(), done
    steps = cfg.student.train.steps
    objective = Objective(
        phase_boundaries(d.phases, steps),
        total_steps=steps,
        kd_schedule=d.kd_weight,
        temperature=d.temperature,
        divergence=d.divergence,
        jsd_beta=d.jsd_beta,
        ce_weight=d.ce_weight,
        feature_weight=d.feature_weight,
        feature_loss=d.feature_loss,
        layer_weights=[p.weight for p in pairs],
        heads=heads,
    )
    x, y = run.data.distill_set()
    task = _task(run, cfg.student, x, y, 2)
    log = MetricsLog(run.dir, "student", tensorboard=log_tensorboard)
    try:
        result = fit(
            stage="student",
            model=model,
            objective=objective,
            task=task,
            train=cfg.student.train,
            stage_dir=run.stage_dir("student"),
            log=log,
            config=to_dict(cfg),
            teacher=LiveTeacher(teacher, task, teacher_taps),
            student_taps=student_taps,
        )
    finally:
        log.close()
    return model.eval(), _finish(run, "student", model, result, heads)


def model_facts(run: Run, model: nn.Module) -> dict[str, int]:
    return {"params": count_params(model), "macs": count_macs(model, run.data.test_x[:1].to(run.device))}


def run_all(cfg: Config, log_tensorboard: bool = True) -> dict:
    """The main job: teacher, baseline, distilled student, results.json and report.md."""
    began = time.monotonic()
    run = open_run(cfg)
    teacher, teacher_result = teacher_stage(run, log_tensorboard)
    baseline, baseline_result = baseline_stage(run, log_tensorboard)
    student, student_result = distill_stage(run, teacher, log_tensorboard)
    results: dict[str, Any] = {"name": cfg.name}
    for stage, model, result in (
        ("teacher", teacher, teacher_result),
        ("baseline", baseline, baseline_result),
        ("student", student, student_result),
    ):
        results[stage] = {**result, **model_facts(run, model)}
    results["student"]["macs_ratio_to_teacher"] = results["student"]["macs"] / max(results["teacher"]["macs"], 1)
    results["wall_seconds"] = round(time.monotonic() - began, 2)
    write_json(run.dir / "results.json", results)
    from distilflow.report import write_report

    write_report(run.dir, cfg, results)
    return results
