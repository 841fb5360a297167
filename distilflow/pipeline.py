"""Stages of a run: teacher, no-teacher baseline, distilled student, evaluation and results.

config -> data -> teacher (trained or loaded) -> baseline student -> distilled student through
the phases -> results.json and report.md. Each stage lives in ``<run_dir>/<stage>/`` with its
checkpoint and final weights; a finished stage is reused, an unfinished one resumes.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.config import Config, config_from_dict, read_yaml, to_dict
from distilflow.data.cache import cache_complete, check_cache, logit_width, reads_cache, teacher_files
from distilflow.data.cache_writer import ModelSignals, write_cache
from distilflow.device import resolve_device
from distilflow.errors import UserError
from distilflow.models.build import load_weights
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
from distilflow.student_side import (
    configured_pairs,
    live_alignment,
    new_student,
    open_run_cache,
    projection_heads,
    student_taps_of,
    teacher_layer_paths,
)
from distilflow.teacher_side import (
    cached_teacher_result,
    check_served_teacher,
    served_signals,
    served_teacher_result,
    shared_vocab_of,
    stopped_note,
    student_columns,
    teacher_client,
    teacher_elsewhere,
    teacher_outline,
)
from distilflow.teachers.cross_tokenizer import TeacherIdsGuard, TeacherOwnIds
from distilflow.teachers.live import LiveTeacher
from distilflow.teachers.served import ServedCacheSignals, ServedTeacher, TeacherUnavailable
from distilflow.train import dist
from distilflow.train.checkpoint import WEIGHTS, write_json
from distilflow.train.precision import cast_teacher, check_teacher_dtype, check_train_options
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
    trained = [("student.train", cfg.student.train)]
    if not cfg.teacher.model.pretrained:  # a given teacher is not trained here
        trained.append(("teacher.train", cfg.teacher.train))
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


def teacher_stage(run: Run, log_tensorboard: bool = True) -> tuple[nn.Module | None, dict]:
    """The teacher: from ``teacher.model.checkpoint`` or a pretrained ``path``, reused, or trained now.

    None when it is not loaded here (``teacher_side.teacher_elsewhere``: served, or a given teacher whose
    signals all come from a complete cache); its result then comes from the server or the manifest."""
    cfg = run.cfg
    if teacher_elsewhere(cfg):
        return None, cached_teacher_result(cfg) if reads_cache(cfg) else served_teacher_result(run)
    model = run.work.new_model("teacher")
    impl, chunk_rows = stage_loss_impl(cfg, run.work, cfg.teacher.train, [model]), cfg.distill.loss_chunk_rows
    task = run.work.task("teacher", cfg.teacher.train, cfg.seed, loss_impl=impl, chunk_rows=chunk_rows)
    if cfg.teacher.model.pretrained:
        if cfg.teacher.model.checkpoint:
            load_weights(model, cfg.teacher.model.checkpoint, "teacher")
        source = cfg.teacher.model.pretrained
        return model.eval(), {**task.evaluate(model), "steps": 0, "loaded_from": source}
    done = load_finished(run, "teacher", model)
    if done is not None:
        return model.eval(), done
    objective = supervised_objective(cfg.teacher.train.steps, impl, chunk_rows)
    result = train_stage(run, "teacher", model, objective, task, log_tensorboard=log_tensorboard)
    model = result.model or model  # dist.strategy fsdp2: the unsharded trained copy
    return model.eval(), finish_stage(run, "teacher", model, result)


def baseline_stage(run: Run, log_tensorboard: bool = True, teacher: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The student trained on labels alone, with the same steps and batch size as distillation.

    ``teacher`` is only used to initialise a student from teacher layers (``init_layers``), so that
    the baseline starts where the distilled student starts.
    """
    model = new_student(run, teacher)
    done = load_finished(run, "baseline", model)
    if done is not None:
        return model.eval(), done
    # Scored over the ids it shares with the teacher, exactly as the distilled student is.
    cfg = run.cfg
    vocab = shared_vocab_of(run, model, teacher)
    impl, chunk_rows = stage_loss_impl(cfg, run.work, cfg.student.train, [model], vocab), cfg.distill.loss_chunk_rows
    task = run.work.task(
        "baseline", cfg.student.train, cfg.seed + 1, vocab_size=vocab, loss_impl=impl, chunk_rows=chunk_rows
    )
    objective = supervised_objective(cfg.student.train.steps, impl, chunk_rows)
    result = train_stage(run, "baseline", model, objective, task, log_tensorboard=log_tensorboard)
    model = result.model or model  # dist.strategy fsdp2: the unsharded trained copy
    return model.eval(), finish_stage(run, "baseline", model, result)


def cache_stage(
    run: Run, teacher: nn.Module | None, *, teacher_result: dict | None = None, quiet: bool = False
) -> dict:
    """The teacher-signal cache of this config written (or finished) from ``teacher``, or from the served
    teacher (``teacher`` None); its manifest. ``teacher_result``: the teacher's score and cost, recorded
    for runs that read the cache instead of loading the teacher; ``quiet``: no progress lines."""
    cfg, work = run.cfg, run.work
    source = work.cache_source()
    if cfg.teacher.server is not None:
        student = work.new_model("student")
        vocab = student_columns(run, student, teacher_outline(run))
        signals: Any = ServedCacheSignals(teacher_client(cfg, top_k=cfg.cache.k), vocab_size=vocab)
        pairs, teacher_layers = [], None
    else:
        student = work.new_model("student", teacher if cfg.student.model.init_from_teacher else None)
        vocab = work.shared_vocab(student, teacher) or logit_width(source, teacher)
        teacher_layers = teacher_layer_paths(run, teacher)
        pairs = configured_pairs(run, student, teacher_layers) if cfg.cache.features else []
        signals = ModelSignals(cfg, source, teacher, vocab_size=vocab, pairs=pairs)
        if teacher_result is not None:
            teacher_result = {**teacher_result, **work.facts(teacher)}
    try:
        return write_cache(
            cfg,
            source,
            signals,
            vocab_size=vocab,
            pairs=pairs,
            teacher_layers=teacher_layers,
            teacher_result=teacher_result,
            quiet=quiet,
        )
    finally:
        if isinstance(signals, ServedCacheSignals):
            signals.client.close()


def distill_stage(
    run: Run, teacher: nn.Module | None, log_tensorboard: bool = True, *, teacher_result: dict | None = None
) -> tuple[nn.Module, dict]:
    """The student distilled from ``teacher`` through the configured phases.

    With ``cache.use`` the teacher's outputs come from the teacher-signal cache (written first when
    missing, from ``teacher`` or the served teacher; ``teacher`` may be None when the cache is
    complete; ``teacher_result`` is recorded in a cache written here). With ``teacher.server`` and no
    cache they come from the server, the next requests sent while the student trains.
    """
    cfg = run.cfg
    served = cfg.teacher.server is not None
    model = new_student(run, teacher)
    student_taps, heads, pairs = None, nn.ModuleList(), []
    if cfg.cache.use:
        if (teacher is not None or served) and not cache_complete(cfg):
            cache_stage(run, teacher, teacher_result=teacher_result)
        cached = open_run_cache(run, model)
        pairs, vocab = cached.pairs, cached.vocab_size
        student_taps = student_taps_of(model, pairs)
        heads = projection_heads(run, model, student_taps, pairs, cached.teacher.feature_shapes())
    elif served:  # top-k log-probabilities only: no features, no teacher model here
        vocab = run.work.shared_vocab(model, teacher_outline(run))
    else:
        aligned = live_alignment(run, model, teacher)
        pairs, student_taps, teacher_taps, heads = (
            aligned.pairs,
            aligned.student_taps,
            aligned.teacher_taps,
            aligned.heads,
        )
        vocab = run.work.shared_vocab(model, teacher)
    done = load_finished(run, "student", model)
    if done is not None:
        return model.eval(), done
    # A cached or served teacher's outputs are tensors given to the loss: only the student runs through the task.
    runs_teacher = not (cfg.cache.use or served)
    impl = stage_loss_impl(cfg, run.work, cfg.student.train, [model] + ([teacher] if runs_teacher else []), vocab)
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
    if cfg.cache.use:
        signals: Any = cached.teacher
    elif served:  # the task sends the teacher's requests ahead (teachers/served.py)
        signals, task = served_signals(run, model, task, objective)
    else:
        # teacher.model.dtype: after init_layers copied float32 weights, before the forward passes.
        frozen = cast_teacher(teacher, cfg.teacher.model.dtype)
        forward: Any = task
        if run.work.cross_tokenizer != "off":  # the teacher reads its own ids of each aligned row (guarded)
            forward = TeacherOwnIds(TeacherIdsGuard(run.work.tokenizer, run.work.teacher_tokenizer))
        signals = LiveTeacher(frozen, forward, teacher_taps)
        signals = dist.current().shard_teacher_signals(signals, teacher)  # torchrun + dist.shard_teacher: FSDP2
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
        )
    except TeacherUnavailable as error:  # the run stops where the server failed; the checkpoint stays
        raise UserError(f"{error}; {stopped_note(run, 'student')}") from None
    finally:
        if isinstance(signals, ServedTeacher):
            signals.close()
    model, heads = result.model or model, result.heads or heads  # dist.strategy fsdp2: unsharded copies
    return model.eval(), finish_stage(run, "student", model, result, heads)


def preflight(run: Run, *, writes_cache: bool = False) -> None:
    """Resolve feature layers and build heads on untrained models, so that a bad layer path or
    shapes no head can map fail before any training (shapes do not depend on the weights).

    When distillation reads a complete teacher cache (``reads_cache``), no teacher is built or loaded
    (a 7B teacher folder would take minutes and its size in memory): the student is checked against
    the cache, whose manifest stands in for the teacher."""
    cfg, device = run.cfg, run.work.device
    served = cfg.teacher.server is not None
    reading = reads_cache(cfg) and not writes_cache  # a complete cache stands in for the teacher
    teacher = None
    if not (served or reading):
        teacher = run.work.new_model("teacher")
        if cfg.teacher.model.checkpoint:  # a missing, foreign or pickled file is refused here
            load_weights(teacher, cfg.teacher.model.checkpoint, "teacher")
    student = new_student(run, teacher)
    if teacher is not None:
        live_alignment(run, student, teacher)
        with warnings.catch_warnings():  # the stages say it (a vocabulary notice) once, when they run
            warnings.simplefilter("ignore")
            run.work.shared_vocab(student, teacher)  # embedding tables the tokenizer does not fit: refused now
    # Precision, gradient checkpointing and teacher dtype must fit the models and the device.
    if not cfg.teacher.model.pretrained:  # trained here: a fresh model, no file read
        check_train_options(cfg.teacher.train, teacher or run.work.new_model("teacher"), device, "teacher.train")
    check_train_options(cfg.student.train, student, device, "student.train")
    check_teacher_dtype(cfg.teacher.model.dtype, device)
    if reading:
        describe, files = teacher_files(cfg)
        missing = [f for f in files if not f.is_file()]
        if cfg.teacher.model.pretrained and missing:  # else: its hash is not compared
            raise UserError(
                f"teacher {describe}: '{missing[0]}' does not exist; give the teacher the cache was made of"
            )
        open_run_cache(run, student)
    elif served:  # the server is the configured teacher: name, tokenizer, vocabulary, k, row length
        outline = teacher_outline(run)
        check_served_teacher(run, outline, writes_cache=writes_cache)
        if cfg.cache.use or writes_cache:
            vocab = student_columns(run, student, outline)
            check_cache(cfg, run.work.cache_source(), vocab_size=vocab, pairs=[], writes=writes_cache)
    elif cfg.cache.use or writes_cache:
        # cache.k within the vocabulary; an existing teacher cache made for this config (intact, with use on).
        source = run.work.cache_source()
        vocab = run.work.shared_vocab(student, teacher) or logit_width(source, teacher)
        pairs = configured_pairs(run, student, teacher_layer_paths(run, teacher))
        check_cache(cfg, source, vocab_size=vocab, pairs=pairs, writes=writes_cache)
    if cfg.deploy.enabled and cfg.deploy.genai.enabled and run.work.per_token:
        from distilflow.deploy.genai import require_genai  # the genai extra: missing is said before training

        require_genai()


def load_trained(run: Run, stage: str) -> nn.Module:
    """The trained model of ``stage`` from this run's folder (or the configured teacher)."""
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
    """The main job: teacher, baseline, distilled student, results.json and report.md."""
    began = time.monotonic()
    if cfg.reasoning.task != "off":  # the reasoning demo has its own stage list
        from distilflow.reasoning import run_reasoning

        return run_reasoning(cfg, log_tensorboard)
    run = open_run(cfg)
    teacher, teacher_result = teacher_stage(run, log_tensorboard)  # None: served, or all in a complete cache
    baseline, baseline_result = baseline_stage(run, log_tensorboard, teacher)
    student, student_result = distill_stage(run, teacher, log_tensorboard, teacher_result=teacher_result)
    results: dict[str, Any] = {"name": cfg.name}
    if run.work.cross_tokenizer != "off":  # the loss that distilled across tokenizers (uld or hybrid)
        results["cross_tokenizer"] = run.work.cross_tokenizer
    for stage, model, result in (
        ("teacher", teacher, teacher_result),
        ("baseline", baseline, baseline_result),
        ("student", student, student_result),
    ):
        results[stage] = {**result, **(run.work.facts(model) if model is not None else {})}
    cost = "macs" if "macs" in results["student"] else "macs_per_token"
    for key, ratio in ((cost, "macs_ratio_to_teacher"), ("params", "params_ratio_to_teacher")):
        # A teacher known only by a cache that did not record its cost has no ratio (its result says why).
        if key in results["teacher"]:
            results["student"][ratio] = results["student"][key] / max(results["teacher"][key], 1)
    preview = run.work.preview(student)
    if preview:
        results["student_samples"] = preview
    if cfg.deploy.enabled and dist.current().is_main:
        from distilflow.deploy.stage import deploy

        info = deploy(run.work, student, cfg.deploy, run.dir / "deploy")
        results["deploy"] = info.pop("variants")
        results["deploy_info"] = info
        results["speed"] = teacher_student_speed(run, teacher, student)
    results["wall_seconds"] = round(time.monotonic() - began, 2)
    if not dist.current().is_main:  # under torchrun rank 0 writes results and report
        return results
    from distilflow.diagnose import diagnose, read_metrics

    # The same signals and rules as 'distilflow diagnose RUN_DIR' reads back from the folder.
    results["diagnosis"] = diagnose(read_metrics(run.dir), results, to_dict(cfg)).to_dict()
    write_json(run.dir / "results.json", results)
    from distilflow.report import write_report

    write_report(run.dir, cfg, results)
    return results
