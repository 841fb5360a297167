"""Checks of a run before anything is written (``pipeline.open_run``): models, layers, caches, teachers.

Shapes do not depend on the weights, so feature layers are resolved and projection heads built on
untrained models, and a bad layer path or shapes no head can map fail before any training. When
distillation reads a complete teacher cache, the teacher is not built or loaded at all (a 7B
teacher folder would take minutes and its size in memory): the cache's manifest stands in for it.
With several teachers (``teachers:``) every teacher is checked in its view (teacher_views.py), and
their label spaces or vocabularies must agree, read from their models or their caches' manifests.
A served teacher (``teacher.server``, one teacher only) is not built either: the server is checked to
serve the configured model (name, tokenizer, vocabulary, k, row length).
"""

from __future__ import annotations

import warnings

from torch import nn

from distilflow.data.cache import check_cache, logit_width, reads_cache, teacher_files
from distilflow.errors import UserError
from distilflow.models.build import load_weights
from distilflow.report_gaps import compared_run
from distilflow.stages import Run
from distilflow.student_side import configured_pairs, live_alignment, new_student, open_run_cache, teacher_layer_paths
from distilflow.teacher_side import check_served_teacher, student_columns, teacher_outline
from distilflow.teacher_views import (
    TeacherView,
    measured_width,
    release_teacher,
    student_vocab,
    teacher_views,
    teachers_cut,
)
from distilflow.train.precision import check_teacher_dtype, check_train_options


def preflight(run: Run, *, writes_cache: bool = False) -> None:
    """Every check that can fail on bad input, on untrained models (see the module docstring)."""
    cfg, device = run.cfg, run.work.device
    views = teacher_views(run)
    if not cfg.teachers:
        teacher = _teacher_model(views[0], writes_cache)
        student = new_student(run, teacher)
        check_train_options(cfg.student.train, student, device, "student.train")
        _check_teacher(views[0], student, teacher, writes_cache)
        with warnings.catch_warnings():  # the stages say it (a vocabulary notice) once, when they run
            warnings.simplefilter("ignore")
            student_vocab(run, student, [teacher])
    else:
        student = new_student(run, None)
        check_train_options(cfg.student.train, student, device, "student.train")
        for view in views:  # one at a time: each teacher's model is dropped before the next is built
            teacher = _teacher_model(view, writes_cache)
            _check_teacher(view, student, teacher, writes_cache)
            measured_width(view, teacher)  # their label space or vocabulary (model or cache manifest)
            del teacher
            if writes_cache:  # cache-teacher loads them one at a time: teachers that do not fit together
                release_teacher(view)
        teachers_cut(run, student)  # one label space or vocabulary, from the widths just measured
    _check_labels(run, views)
    compared_run(cfg)  # report.compare_to: a finished run folder of the same metric
    if cfg.deploy.enabled and cfg.deploy.genai.enabled and run.work.per_token:
        from distilflow.deploy.genai import require_genai  # the genai extra: missing is said before training

        require_genai()


def _teacher_model(view: TeacherView, writes_cache: bool) -> nn.Module | None:
    """The view's teacher, untrained (its checkpoint loaded, so a missing, foreign or pickled file is
    refused here), or None when distillation reads its complete cache instead."""
    if view.cache_only or _reading(view, writes_cache) or view.cfg.teacher.server is not None:
        return None
    teacher = view.run.work.new_model("teacher")
    if view.cfg.teacher.model.checkpoint:
        load_weights(teacher, view.cfg.teacher.model.checkpoint, _role(view))
    return teacher


def _reading(view: TeacherView, writes_cache: bool) -> bool:
    """Distillation reads the view's complete cache, which stands in for its teacher."""
    return view.cache_only or (not writes_cache and reads_cache(view.cfg))


def _role(view: TeacherView) -> str:
    return f"teacher '{view.name}'" if view.named else "teacher"


def _check_teacher(view: TeacherView, student: nn.Module, teacher: nn.Module | None, writes_cache: bool) -> None:
    """One teacher: its layers against the student's, its training options, its dtype, its cache."""
    run, cfg, device = view.run, view.cfg, view.run.work.device
    if teacher is not None:
        live_alignment(run, student, teacher)
        with warnings.catch_warnings():  # the stages say it (a vocabulary notice) once, when they run
            warnings.simplefilter("ignore")
            run.work.shared_vocab(student, teacher)  # embedding tables the tokenizer does not fit: refused now
    if not cfg.teacher.model.pretrained and not view.cache_only:  # trained here: a fresh model, no file read
        model = teacher or run.work.new_model("teacher")
        check_train_options(cfg.teacher.train, model, device, _key(view, "train"))
    check_teacher_dtype(cfg.teacher.model.dtype, device, _key(view, "model.dtype"))
    if _reading(view, writes_cache):  # a complete cache stands in for the teacher
        describe, files = teacher_files(cfg)
        missing = [f for f in files if not f.is_file()]
        if cfg.teacher.model.pretrained and missing:  # else: its hash is not compared
            raise UserError(
                f"teacher {describe}: '{missing[0]}' does not exist; give the teacher the cache was made of"
            )
        open_run_cache(run, student)
    elif cfg.teacher.server is not None:  # the server is the configured teacher: name, tokenizer, vocabulary, k, rows
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


def _key(view: TeacherView, key: str) -> str:
    """The config key of the view's teacher: ``teachers.<name>.<key>``, or ``teacher.<key>``."""
    return f"teachers.{view.name}.{key}" if view.named else f"teacher.{key}"


def _check_labels(run: Run, views: list[TeacherView]) -> None:
    """A label-free run's file may lack labels; a teacher trained here cannot."""
    if run.work.labelled:
        return
    for view in views:
        if not view.given and not view.cache_only:
            raise UserError(
                f"{_role(view)} would be trained here, but the training data holds no labels "
                f"(distill.label_free); give its weights ({_key(view, 'model.checkpoint')} or model.hf.path) or "
                "its cache"
            )
