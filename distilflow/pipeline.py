"""Stages of a run: teacher, no-teacher baseline, distilled student, evaluation and results.

config -> data -> teacher (trained or loaded) -> baseline student -> distilled student through
the phases -> results.json and report.md. Each stage lives in ``<run_dir>/<stage>/`` with its
checkpoint and final weights; a finished stage is reused, an unfinished one resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from distilflow.config import Config, TrainConfig, config_from_dict, read_yaml, to_dict
from distilflow.errors import UserError
from distilflow.losses.objective import Objective, choose_loss_impl
from distilflow.models.build import load_weights
from distilflow.models.heads import build_head
from distilflow.models.layers import LayerPair, layer_pairs
from distilflow.models.taps import Taps
from distilflow.schedules import Phase, phase_boundaries
from distilflow.train import dist
from distilflow.train.checkpoint import HEADS, WEIGHTS, write_json, write_text, write_weights
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import FitResult, LiveTeacher, fit
from distilflow.train.precision import cast_teacher, check_teacher_dtype, check_train_options
from distilflow.workload import Workload, make_workload

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
    """Everything the stages share: config, workload (data, model builders, device), folder."""

    cfg: Config
    work: Workload

    @property
    def dir(self) -> Path:
        return self.cfg.run_dir

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage


def open_run(cfg: Config, *, writes_cache: bool = False) -> Run:
    """Check the output folder (same config or empty), load data, check the models, save the config.

    Everything that can fail on bad input runs before anything is written, so the corrected
    command can use the same output_dir.
    """
    if cfg.reasoning.task != "off":  # its own stage list (distilflow/reasoning.py), with its own folder layout
        raise UserError(f"reasoning.task {cfg.reasoning.task!r}: the reasoning demo runs with 'distilflow run' only")
    world = dist.env_world()  # under torchrun: every rank refuses a batch that does not split, before joining
    trained = [("student.train", cfg.student.train)]
    if not (cfg.teacher.model.checkpoint or cfg.teacher.model.path):  # a given teacher is not trained here
        trained.append(("teacher.train", cfg.teacher.train))
    for key, train in trained:
        world.check_batch(train.batch_size, train.grad_accum, key)
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    resolved = to_dict(cfg)
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"output_dir '{run_dir}': '{blocking}' is a file, not a folder; choose another output_dir")
    if saved.is_file():
        # Deploy settings do not change what was trained: a finished run may be re-exported and
        # re-quantized with other ones (the saved config then records the latest).
        # output_dir only says where the folder is (a run folder given to eval or export, or moved).
        diff = [
            key
            for key in _differences(read_yaml(saved), resolved)
            # dist: how the processes share the work does not change what is trained (any world size
            # and strategy resumes a run).
            if not key.startswith(("deploy.", "dist.")) and key != "output_dir"
        ]
        if diff:
            raise UserError(
                f"output_dir '{run_dir}' holds a run with a different config (keys: {', '.join(diff[:6])}); "
                "choose another output_dir, or 'distilflow resume' it with its own config"
            )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = dist.setup(cfg, resolve_device(cfg.device))  # torchrun: join the process group (else nothing)
    with world.main_first("preparing the data"):  # rank 0 fills the dataset and tokenizer caches first
        run = Run(cfg, make_workload(cfg, world.place(resolve_device(cfg.device))))
    preflight(run, writes_cache=writes_cache)  # cache-teacher: cache.k and the cache folder too
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        write_text(saved, yaml.safe_dump(resolved, sort_keys=False))
    return run


def config_of_run(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a distilflow run folder (no config.yaml)")
    return config_from_dict(read_yaml(path))


def stage_loss_impl(
    cfg: Config, work: Workload, train: TrainConfig, models: list[nn.Module], vocab_size: int | None = None
) -> str:
    """``distill.loss_impl`` resolved once for a stage; its task and its objective get this one value.

    ``auto`` decides by the logit entries of one micro-batch of the global batch (``train``), so the
    choice does not depend on the number of processes. ``fused`` needs every model that runs
    through the stage's task (the student, and a live teacher) to compute its logits as
    ``lm_head(hidden)``; under ``auto`` a model that does not falls back to ``chunked``, an explicit
    ``fused`` is refused with one line.
    """
    positions, columns = work.logit_shape(models[0], vocab_size)
    micro = max(train.batch_size // max(train.grad_accum, 1), 1)
    setting = cfg.distill.loss_impl
    impl = choose_loss_impl(setting, rows=micro * positions, vocab_size=columns, hidden_states=work.per_token)
    if impl == "fused":
        problem = next((p for p in map(work.fused_problem, models) if p), None)
        if problem and setting == "fused":
            raise UserError(f"distill.loss_impl fused: {problem}; use distill.loss_impl=chunked or plain")
        if problem:
            impl = "chunked"
    return impl


def supervised_objective(total_steps: int, loss_impl: str, chunk_rows: int) -> Objective:
    """The teacher's and the baseline's objective: cross-entropy on the labels alone."""
    return Objective(
        [Phase("supervised", 0, total_steps, ("ce",))],
        total_steps=total_steps,
        ce_weight=1.0,
        loss_impl=loss_impl,
        chunk_rows=chunk_rows,
    )


def _finish(
    run: Run, stage: str, model: nn.Module, result: FitResult, heads: nn.Module | None = None, facts: dict | None = None
) -> dict:
    stage_dir = run.stage_dir(stage)
    summary = {
        **result.metrics,
        **(facts or {}),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        f"train_{result.unit}_per_s": round(result.units_per_s, 1),
        **result.memory,
    }
    world = dist.current()
    if world.is_main:  # under torchrun rank 0 writes; the others wait for the files (barrier below)
        write_weights(stage_dir / WEIGHTS, model.state_dict(), {"stage": stage})
        if heads is not None and len(list(heads.parameters())):
            write_weights(stage_dir / HEADS, heads.state_dict(), {"stage": stage})
        run.work.save(stage_dir, model)
        write_json(stage_dir / RESULT, summary)
    world.barrier(f"saving the {stage}")
    return summary


def _load_finished(run: Run, stage: str, model: nn.Module) -> dict | None:
    stage_dir = run.stage_dir(stage)
    if not (stage_dir / RESULT).is_file() or not (stage_dir / WEIGHTS).is_file():
        return None
    load_weights(model, stage_dir / WEIGHTS, stage)
    return json.loads((stage_dir / RESULT).read_text())


def _train(
    run: Run, stage: str, model: nn.Module, objective: Objective, task, log_tensorboard: bool, **extra
) -> FitResult:
    train = run.cfg.teacher.train if stage == "teacher" else run.cfg.student.train
    log = MetricsLog(run.dir, stage, tensorboard=log_tensorboard) if dist.current().is_main else dist.NullLog()
    try:
        return fit(
            stage=stage,
            model=model,
            objective=objective,
            task=task,
            train=train,
            stage_dir=run.stage_dir(stage),
            log=log,
            config=to_dict(run.cfg),
            **extra,
        )
    finally:
        log.close()


def teacher_stage(run: Run, log_tensorboard: bool = True) -> tuple[nn.Module, dict]:
    """The teacher: from ``teacher.model.checkpoint`` or a pretrained ``path``, reused, or trained now."""
    cfg = run.cfg
    model = run.work.new_model("teacher")
    impl, chunk_rows = stage_loss_impl(cfg, run.work, cfg.teacher.train, [model]), cfg.distill.loss_chunk_rows
    task = run.work.task("teacher", cfg.teacher.train, cfg.seed, loss_impl=impl, chunk_rows=chunk_rows)
    if cfg.teacher.model.checkpoint or cfg.teacher.model.path:
        if cfg.teacher.model.checkpoint:
            load_weights(model, cfg.teacher.model.checkpoint, "teacher")
        source = cfg.teacher.model.checkpoint or cfg.teacher.model.path
        return model.eval(), {**task.evaluate(model), "steps": 0, "loaded_from": source}
    done = _load_finished(run, "teacher", model)
    if done is not None:
        return model.eval(), done
    objective = supervised_objective(cfg.teacher.train.steps, impl, chunk_rows)
    result = _train(run, "teacher", model, objective, task, log_tensorboard)
    model = result.model or model  # dist.strategy fsdp2: the unsharded trained copy
    return model.eval(), _finish(run, "teacher", model, result)


def _student_init(run: Run, teacher: nn.Module | None) -> nn.Module:
    model = run.work.new_model("student", teacher)
    if run.cfg.student.model.checkpoint:
        load_weights(model, run.cfg.student.model.checkpoint, "student")
    return model


def baseline_stage(run: Run, log_tensorboard: bool = True, teacher: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The student trained on labels alone, with the same steps and batch size as distillation.

    ``teacher`` is only used to initialise a student from teacher layers (``init_layers``), so that
    the baseline starts where the distilled student starts.
    """
    model = _student_init(run, teacher)
    done = _load_finished(run, "baseline", model)
    if done is not None:
        return model.eval(), done
    # Scored over the ids it shares with the teacher, exactly as the distilled student is.
    cfg = run.cfg
    vocab = run.work.shared_vocab(model, teacher)
    impl, chunk_rows = stage_loss_impl(cfg, run.work, cfg.student.train, [model], vocab), cfg.distill.loss_chunk_rows
    task = run.work.task(
        "baseline", cfg.student.train, cfg.seed + 1, vocab_size=vocab, loss_impl=impl, chunk_rows=chunk_rows
    )
    objective = supervised_objective(cfg.student.train.steps, impl, chunk_rows)
    result = _train(run, "baseline", model, objective, task, log_tensorboard)
    model = result.model or model  # dist.strategy fsdp2: the unsharded trained copy
    return model.eval(), _finish(run, "baseline", model, result)


def build_heads(
    run: Run,
    student: nn.Module,
    teacher: nn.Module,
    pairs: list[LayerPair],
    student_taps: Taps,
    teacher_taps: Taps,
) -> nn.ModuleList:
    """One projection head per layer pair, sized from the shapes seen on a probe batch."""
    probe, forward = run.work.probe(), run.work.forward
    was_training = student.training
    student.eval()
    with torch.no_grad(), student_taps.capture(), teacher_taps.capture():
        forward(student, probe)
        forward(teacher, probe)
    student.train(was_training)
    s_feats, t_feats = student_taps.features(), teacher_taps.features()
    torch.manual_seed(run.cfg.seed + 2)
    heads = nn.ModuleList()
    for pair, s, t in zip(pairs, s_feats, t_feats):
        name = f"student '{pair.student}' -> teacher '{pair.teacher}'"
        heads.append(build_head(tuple(s.shape[1:]), tuple(t.shape[1:]), per_token=run.work.per_token, name=name))
    return heads.to(run.work.device)


def _taps_and_heads(run: Run, student: nn.Module, teacher: nn.Module):
    pairs = layer_pairs(run.cfg.distill, run.work.layer_paths(student), run.work.layer_paths(teacher))
    if not pairs:
        return None, None, nn.ModuleList(), []
    student_taps = Taps(student, [p.student for p in pairs], "student")
    teacher_taps = Taps(teacher, [p.teacher for p in pairs], "teacher")
    heads = build_heads(run, student, teacher, pairs, student_taps, teacher_taps)
    return student_taps, teacher_taps, heads, pairs


def preflight(run: Run, *, writes_cache: bool = False) -> None:
    """Resolve feature layers and build heads on untrained models, so that a bad layer path or
    shapes no head can map fail before any training (shapes do not depend on the weights).

    When distillation reads a complete teacher cache (``reads_cache``), no teacher is built or loaded
    (a 7B teacher folder would take minutes and its size in memory): the student is checked against
    the cache, whose manifest stands in for the teacher (see ``check_config``)."""
    from distilflow.data.cache import check_config, reads_cache

    cfg, device = run.cfg, run.work.device
    teacher = None
    if writes_cache or not reads_cache(cfg):
        teacher = run.work.new_model("teacher")
        if cfg.teacher.model.checkpoint:  # a missing, foreign or pickled file is refused here
            load_weights(teacher, cfg.teacher.model.checkpoint, "teacher")
    student = _student_init(run, teacher)
    if teacher is not None:
        _taps_and_heads(run, student, teacher)
    # Precision, gradient checkpointing and teacher dtype must fit the models and the device.
    if not (cfg.teacher.model.checkpoint or cfg.teacher.model.path):  # trained here: a fresh model, no file read
        check_train_options(cfg.teacher.train, teacher or run.work.new_model("teacher"), device, "teacher.train")
    check_train_options(cfg.student.train, student, device, "student.train")
    check_teacher_dtype(cfg.teacher.model.dtype, device)
    # cache.k within the vocabulary; an existing teacher cache made for this config (and intact, with use on).
    check_config(run, teacher, student, writes=writes_cache)
    if cfg.deploy.enabled and cfg.deploy.genai.enabled and run.work.per_token:
        from distilflow.deploy.genai import require_genai  # the genai extra: missing is said before training

        require_genai()


def distill_stage(run: Run, teacher: nn.Module | None, log_tensorboard: bool = True) -> tuple[nn.Module, dict]:
    """The student distilled from ``teacher`` through the configured phases.

    With ``cache.use`` the teacher's outputs come from the teacher-signal cache (written first when
    missing and a teacher is given; ``teacher`` may be None when the cache is complete).
    """
    cfg, d = run.cfg, run.cfg.distill
    model = _student_init(run, teacher)
    if cfg.cache.use:
        from distilflow.data.cache_reader import open_cache

        cached, side = open_cache(run, model, teacher)
        student_taps, heads, pairs = side.student_taps, side.heads, side.pairs
    else:
        student_taps, teacher_taps, heads, pairs = _taps_and_heads(run, model, teacher)
    done = _load_finished(run, "student", model)
    if done is not None:
        return model.eval(), done
    steps = cfg.student.train.steps
    vocab = side.vocab_size if cfg.cache.use else run.work.shared_vocab(model, teacher)
    # A cached teacher's outputs are stored tensors: only the student runs through the task.
    impl = stage_loss_impl(cfg, run.work, cfg.student.train, [model] + ([] if cfg.cache.use else [teacher]), vocab)
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
        per_token=run.work.per_token,
        loss_impl=impl,
        chunk_rows=d.loss_chunk_rows,
    )
    task = run.work.task(
        "student", cfg.student.train, cfg.seed + 1, vocab_size=vocab, loss_impl=impl, chunk_rows=d.loss_chunk_rows
    )
    if cfg.on_policy.lmbda > 0:  # GKD: a batch source that samples continuations from this student
        from distilflow.tasks.on_policy import on_policy_task

        task = on_policy_task(
            task, model, cfg.on_policy, run.work.tokenizer, seed=cfg.seed + 3, total_steps=cfg.student.train.steps
        )
    if cfg.cache.use:
        signals = cached
    else:
        # teacher.model.dtype: after init_layers copied float32 weights, before the forward passes.
        signals = LiveTeacher(cast_teacher(teacher, cfg.teacher.model.dtype), task, teacher_taps)
        signals = dist.current().shard_teacher_signals(signals, teacher)  # torchrun + dist.shard_teacher: FSDP2
    result = _train(
        run,
        "student",
        model,
        objective,
        task,
        log_tensorboard,
        teacher=signals,
        student_taps=student_taps,
    )
    model, heads = result.model or model, result.heads or heads  # dist.strategy fsdp2: unsharded copies
    return model.eval(), _finish(run, "student", model, result, heads)


def load_trained(run: Run, stage: str) -> nn.Module:
    """The trained model of ``stage`` from this run's folder (or the configured teacher)."""
    cfg = run.cfg
    needs_teacher = stage == "teacher" or bool(cfg.student.model.init_layers)
    teacher = run.work.new_model("teacher") if needs_teacher else None
    if stage == "teacher" and (cfg.teacher.model.checkpoint or cfg.teacher.model.path):
        if cfg.teacher.model.checkpoint:
            load_weights(teacher, cfg.teacher.model.checkpoint, "teacher")
        return teacher.eval()
    model = teacher if stage == "teacher" else run.work.new_model("student", teacher)
    folder = run.stage_dir(stage)
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"no trained {stage} in '{folder}'; run 'distilflow run' with this config first")
    load_weights(model, folder / WEIGHTS, stage)
    return model.eval()


def run_all(cfg: Config, log_tensorboard: bool = True) -> dict:
    """The main job: teacher, baseline, distilled student, results.json and report.md."""
    began = time.monotonic()
    if cfg.reasoning.task != "off":  # the reasoning demo has its own stage list
        from distilflow.reasoning import run_reasoning

        return run_reasoning(cfg, log_tensorboard)
    run = open_run(cfg)
    teacher, teacher_result = teacher_stage(run, log_tensorboard)
    baseline, baseline_result = baseline_stage(run, log_tensorboard, teacher)
    student, student_result = distill_stage(run, teacher, log_tensorboard)
    results: dict[str, Any] = {"name": cfg.name}
    for stage, model, result in (
        ("teacher", teacher, teacher_result),
        ("baseline", baseline, baseline_result),
        ("student", student, student_result),
    ):
        results[stage] = {**result, **run.work.facts(model)}
    cost = "macs" if "macs" in results["teacher"] else "macs_per_token"
    results["student"]["macs_ratio_to_teacher"] = results["student"][cost] / max(results["teacher"][cost], 1)
    results["student"]["params_ratio_to_teacher"] = results["student"]["params"] / max(results["teacher"]["params"], 1)
    preview = run.work.preview(student)
    if preview:
        results["student_samples"] = preview
    if cfg.deploy.enabled and dist.current().is_main:
        from distilflow.deploy.stage import deploy

        info = deploy(run.work, student, cfg.deploy, run.dir / "deploy")
        results["deploy"] = info.pop("variants")
        results["deploy_info"] = info
    results["wall_seconds"] = round(time.monotonic() - began, 2)
    if not dist.current().is_main:  # under torchrun rank 0 writes results and report
        return results
    write_json(run.dir / "results.json", results)
    from distilflow.report import write_report

    write_report(run.dir, cfg, results)
    return results
