"""Stages of a run: teacher, no-teacher baseline, distilled student, evaluation and results.

config -> data -> teacher (trained or loaded) -> baseline student -> distilled student through
the phases -> results.json and report.md. Each stage lives in ``<run_dir>/<stage>/`` with its
checkpoint and final weights; a finished stage is reused, an unfinished one resumes. The teacher's
stage is teacher_stages.py; where each kind of teacher's signals come from, teacher_signals.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.config import Config, config_from_dict, read_yaml, to_dict
from distilflow.config_teachers import adaptive_of, trained_sections
from distilflow.data.cache import logit_width
from distilflow.device import resolve_device
from distilflow.errors import UserError
from distilflow.models.build import load_weights
from distilflow.preflight import preflight
from distilflow.stages import (
    Run,
    check_output_dir,
    distill_objective,
    finish_stage,
    load_finished,
    save_config,
    stage_loss_impl,
    supervised_objective,
    train_stage,
)
from distilflow.storage import check_writable
from distilflow.student_side import new_student
from distilflow.tasks.label_free import LabelFreeTask
from distilflow.teacher_side import stopped_note
from distilflow.teacher_signals import student_signals, teacher_side
from distilflow.teacher_stages import Teachers, teachers_stage
from distilflow.teacher_views import feature_index, student_vocab, teacher_views
from distilflow.teachers.served import ServedTeacher, TeacherUnavailable
from distilflow.train import dist
from distilflow.train.checkpoint import WEIGHTS, write_json
from distilflow.train.kd_position import PositionWeights
from distilflow.workload import make_workload


def refuse_reasoning_demo(cfg: Config) -> None:
    """The reasoning demo has its own stage list (distilflow/reasoning.py) and folder layout."""
    if cfg.reasoning.task != "off":
        raise UserError(f"reasoning.task {cfg.reasoning.task!r}: the reasoning demo runs with 'distilflow run' only")


def open_run(cfg: Config, *, writes_cache: bool = False) -> Run:
    """Check the output folder (same config or empty), load data, check the models, save the config.

    Everything that can fail on bad input runs before anything is written, so the corrected
    command can use the same output_dir; an output folder that cannot be written is refused first.
    Under torchrun every rank checks the same inputs and rank 0 alone reports what is wrong.
    """
    with dist.input_checks():
        return _open_run(cfg, writes_cache=writes_cache)


def _open_run(cfg: Config, *, writes_cache: bool) -> Run:
    refuse_reasoning_demo(cfg)
    world = dist.env_world()  # under torchrun: every rank refuses a batch that does not split, before joining
    # Given teachers are not trained here.
    trained = [
        (f"{key}.train", s.train) for key, s in trained_sections(cfg) if key == "student" or not s.model.pretrained
    ]
    for key, train in trained:
        world.check_batch(train.batch_size, train.grad_accum, key)
    check_output_dir(cfg)
    check_writable(cfg.run_dir, "output_dir")
    if (cfg.cache.use or writes_cache) and cfg.cache.path:
        check_writable(cfg.cache.path, "cache.path")  # another folder than the run's
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.setup(cfg, resolve_device(cfg.device))  # torchrun: join the process group (else nothing)
    with world.main_first("preparing the data"):  # rank 0 fills the dataset and tokenizer caches first
        run = Run(cfg, make_workload(cfg, world.place(resolve_device(cfg.device))))
    preflight(run, writes_cache=writes_cache)  # cache-teacher: cache.k and the cache folder too
    save_config(cfg)
    return run


def config_of_run(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a distilflow run folder (no config.yaml)")
    cfg = config_from_dict(read_yaml(path), where=f"run folder config '{path}'")
    # The folder given is the run, wherever it was made: a copied or moved run folder resumes in place
    # (its saved output_dir may name the original, which must not be written to).
    return dataclasses.replace(cfg, output_dir=str(run_dir))


def _teacher_list(run: Run, teacher: Teachers) -> list[nn.Module | None]:
    """``teacher`` as one entry per teacher view (the one teacher of ``teacher:``, or the list)."""
    models = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if len(models) != len(teacher_views(run)):
        raise ValueError(f"{len(models)} teacher models for {len(teacher_views(run))} teachers")
    return models


def _init_teacher(run: Run, models: list[nn.Module | None]) -> nn.Module | None:
    """The teacher a student may copy layers from (``init_layers``, refused with ``teachers:``)."""
    return None if run.cfg.teachers else models[0]


def baseline_stage(run: Run, log_tensorboard: bool = True, teacher: Teachers = None) -> tuple[nn.Module, dict]:
    """The student trained on labels alone, with the same steps and batch size as distillation.

    ``teacher`` is only used to initialise a student from teacher layers (``init_layers``), so that
    the baseline starts where the distilled student starts, and to score it over the ids it shares
    with the teachers (``teachers:``: one entry per teacher, None for a cached one).
    """
    models = _teacher_list(run, teacher)
    model = new_student(run, _init_teacher(run, models))
    done = load_finished(run, "baseline", model)
    if done is not None:
        return model.eval(), done
    # Scored over the ids it shares with the teacher, exactly as the distilled student is.
    cfg = run.cfg
    vocab = student_vocab(run, model, models)
    impl, chunk_rows = stage_loss_impl(cfg, run.work, cfg.student.train, [model], vocab), cfg.distill.loss_chunk_rows
    task = run.work.task(
        "baseline", cfg.student.train, cfg.seed + 1, vocab_size=vocab, loss_impl=impl, chunk_rows=chunk_rows
    )
    objective = supervised_objective(cfg.student.train.steps, impl, chunk_rows)
    result = train_stage(run, "baseline", model, objective, task, log_tensorboard=log_tensorboard)
    model = result.model or model  # dist.strategy fsdp2: the unsharded trained copy
    return model.eval(), finish_stage(run, "baseline", model, result)


def distill_stage(
    run: Run,
    teacher: Teachers,
    log_tensorboard: bool = True,
    *,
    teacher_result: dict | list[dict | None] | None = None,
) -> tuple[nn.Module, dict]:
    """The student distilled from ``teacher`` through the configured phases.

    With ``cache.use`` the teacher's outputs come from the teacher-signal cache (written first when
    missing, from ``teacher`` or the served teacher; ``teacher`` may be None when the cache is
    complete; ``teacher_result`` is recorded in a cache written here). With ``teacher.server`` and no
    cache they come from the server, the next requests sent while the student trains. With
    ``teachers:``, ``teacher`` (and ``teacher_result``) hold one entry per teacher (None for one read
    from its complete cache) and their signals are combined (``distill.combine``, routed by
    ``data.teacher_column``).
    """
    cfg = run.cfg
    models = _teacher_list(run, teacher)
    results = list(teacher_result) if isinstance(teacher_result, (list, tuple)) else [teacher_result] * len(models)
    model = new_student(run, _init_teacher(run, models))
    shared = student_vocab(run, model, models) if cfg.teachers else None  # several: one checked cut
    views = teacher_views(run)
    sides = [teacher_side(view, model, t, shared, r) for view, t, r in zip(views, models, results)]
    feature = sides[feature_index(run)]
    pairs, student_taps, heads = feature.pairs, feature.student_taps, feature.heads
    vocab = shared if cfg.teachers else feature.vocab
    done = load_finished(run, "student", model)
    if done is not None:
        return model.eval(), done
    # A cached or served teacher's outputs are tensors given to the loss: only the student runs through the task.
    live = [t for t, side in zip(models, sides) if side.cache is None and t is not None]
    impl = stage_loss_impl(cfg, run.work, cfg.student.train, [model, *live], vocab)
    objective = distill_objective(
        cfg.distill,
        cfg.student.train.steps,
        loss_impl=impl,
        per_token=run.work.per_token,
        layer_weights=[p.weight for p in pairs],
        heads=heads,
        aligned=run.work.aligned_kd,  # across tokenizers: ULD or the hybrid on aligned groups
    )
    task = run.work.task(
        "student", cfg.student.train, cfg.seed + 1, vocab, loss_impl=impl, chunk_rows=cfg.distill.loss_chunk_rows
    )
    if cfg.on_policy.lmbda > 0:  # GKD: a batch source that samples continuations from this student
        from distilflow.tasks.on_policy import on_policy_task

        task = on_policy_task(
            task, model, cfg.on_policy, run.work.tokenizer, seed=cfg.seed + 3, total_steps=cfg.student.train.steps
        )
    if cfg.distill.label_free:  # the loss reads no label
        task = LabelFreeTask(task)
    width = vocab or logit_width(run.work.cache_source(), model)  # the ids every teacher signal spans
    signals, task = student_signals(run, sides, models, model, task, objective, width, features=bool(pairs))
    kd_position = None
    if cfg.distill.adaptive is not None:
        kd_position = PositionWeights(adaptive_of(cfg), vocab_size=width, chunk_rows=cfg.distill.loss_chunk_rows)
    try:
        result = train_stage(
            run,
            "student",
            model,
            objective,
            task,
            log_tensorboard=log_tensorboard,
            teacher=signals,
            student_taps=student_taps,
            pairs=pairs,
            kd_position=kd_position,
        )
    except TeacherUnavailable as error:  # the run stops where the server failed; the checkpoint stays
        raise UserError(f"{error}; {stopped_note(run, 'student')}") from None
    finally:
        if isinstance(signals, ServedTeacher):
            signals.close()
    model, heads = result.model or model, result.heads or heads  # dist.strategy fsdp2: unsharded copies
    return model.eval(), finish_stage(run, "student", model, result, heads)


def load_trained(run: Run, stage: str) -> nn.Module:
    """The trained model of ``stage`` from this run's folder (or the configured teacher); ``run`` is
    a teacher's view for one of several teachers."""
    cfg = run.cfg
    needs_teacher = stage == "teacher" or bool(cfg.student.model.init_from_teacher)
    teacher = run.work.new_model("teacher") if needs_teacher else None
    if stage == "teacher" and cfg.teacher.model.pretrained:
        if cfg.teacher.model.checkpoint:
            load_weights(teacher, cfg.teacher.model.checkpoint, "teacher")
        return teacher.eval()
    model = teacher if stage == "teacher" else run.work.new_model("student", teacher)
    folder = run.stage_dir(stage)
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"no trained {stage} in '{folder}'; run 'distilflow run' with this config first")
    load_weights(model, folder / WEIGHTS, stage)
    return model.eval()


def teacher_student_speed(run: Run, teacher: nn.Module, student: nn.Module) -> dict:
    """Eager teacher and student latency side by side (``deploy.threads``): classifiers at
    ``deploy.batch_sizes``; causal LMs at batch 1 (a large teacher's full batch would take minutes).
    Not measured ({}) for a teacher kept in bfloat16 / float16 (``teacher.model.dtype``)."""
    from distilflow.deploy.bench import teacher_student_latency

    d, kind = run.cfg.deploy, run.work.kind
    if any(p.dtype != torch.float32 for p in teacher.parameters()):  # teacher.model.dtype: not cast up here
        return {}
    models = [m.cpu().eval() for m in (teacher, student)]
    batches = [1] if kind == "causal_lm" else d.batch_sizes
    iterations = min(d.iterations, 10)
    return teacher_student_latency(
        *models, run.work.test_arrays(), kind=kind, batch_sizes=batches, threads=d.threads, iterations=iterations
    )


def run_all(cfg: Config, log_tensorboard: bool = True) -> dict:
    """The main job: teacher(s), baseline, distilled student, results.json and report.md.

    The baseline needs training labels: a label-free run whose data has none has no baseline."""
    began = time.monotonic()
    if cfg.reasoning.task != "off":  # the reasoning demo has its own stage list
        from distilflow.reasoning import run_reasoning

        return run_reasoning(cfg, log_tensorboard)
    run = open_run(cfg)
    trained = teachers_stage(run, log_tensorboard)  # a teacher's model is None: served, or all in a complete cache
    teacher = [m for m, _ in trained] if cfg.teachers else trained[0][0]
    stages: list[tuple[str, nn.Module | None, dict]] = []
    if run.work.labelled:
        stages.append(("baseline", *baseline_stage(run, log_tensorboard, teacher)))
    teacher_results = [r for _, r in trained]
    student, student_result = distill_stage(run, teacher, log_tensorboard, teacher_result=teacher_results)
    stages.append(("student", student, student_result))
    results: dict[str, Any] = {"name": cfg.name}
    if run.work.cross_tokenizer != "off":  # the loss that distilled across tokenizers (uld or hybrid)
        results["cross_tokenizer"] = run.work.cross_tokenizer
    teacher_rows = {}
    for view, (model, result) in zip(teacher_views(run), trained):
        teacher_rows[view.name] = {**result, **(run.work.facts(model) if model is not None else {})}
    if cfg.teachers:
        results["teachers"] = teacher_rows
    else:
        results["teacher"] = teacher_rows[teacher_views(run)[0].name]
    for stage, model, result in stages:
        results[stage] = {**result, **run.work.facts(model)}
    cost = "macs" if "macs" in results["student"] else "macs_per_token"
    # Against the largest teacher (with several) whose cost is known: a teacher known only by a cache
    # that did not record its cost has no ratio (its result says why).
    largest = max((r for r in teacher_rows.values() if cost in r), key=lambda r: r[cost], default=None)
    for key, ratio in ((cost, "macs_ratio_to_teacher"), ("params", "params_ratio_to_teacher")):
        if largest is not None and key in largest:
            results["student"][ratio] = results["student"][key] / max(largest[key], 1)
    preview = run.work.preview(student)
    if preview:
        results["student_samples"] = preview
    if cfg.deploy.enabled and dist.current().is_main:
        from distilflow.deploy.stage import deploy

        info = deploy(run.work, student, cfg.deploy, run.dir / "deploy")
        results["deploy"] = info.pop("variants")
        results["deploy_info"] = info
        # Against the teacher (with several: the largest with a model here).
        live = [m for m in (teacher if cfg.teachers else [teacher]) if m is not None]  # none: served or cached
        if live:
            largest = max(live, key=lambda m: sum(p.numel() for p in m.parameters()))
            results["speed"] = teacher_student_speed(run, largest, student)
    results["wall_seconds"] = round(time.monotonic() - began, 2)
    if not dist.current().is_main:  # under torchrun rank 0 writes results and report
        return results
    from distilflow.diagnose import diagnose, read_metrics

    # The same signals and rules as 'distilflow diagnose RUN_DIR' reads back from the folder.
    results["diagnosis"] = diagnose(read_metrics(run.dir), results, to_dict(cfg)).to_dict()
    from distilflow.report_gaps import gaps

    if (gap := gaps(cfg, results)) is not None:  # label-free or report.compare_to: how close the student gets
        results["gaps"] = gap
    write_json(run.dir / "results.json", results)
    from distilflow.report import write_report

    write_report(run.dir, cfg, results)
    return results
