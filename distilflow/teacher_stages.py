"""The teacher's stage of every command: trained here, loaded (given, or trained already), or stood in
for by its complete cache or its server (teacher_side.py), for ``run``, ``train-teacher``, ``distill``
and ``cache-teacher``; with ``teachers:`` on each teacher's view (teacher_views.py).
"""

from __future__ import annotations

from torch import nn

from distilflow.config import Config
from distilflow.data.cache import cache_complete, cache_dir
from distilflow.errors import UserError
from distilflow.models.build import load_weights
from distilflow.stages import Run, finish_stage, load_finished, stage_loss_impl, supervised_objective, train_stage
from distilflow.student_side import new_student
from distilflow.teacher_side import elsewhere_result, teacher_elsewhere
from distilflow.teacher_signals import cache_stage
from distilflow.teacher_views import (
    TeacherView,
    check_teacher_weights,
    feature_teacher_name,
    release_teacher,
    stand_in,
    teacher_views,
    teachers_cut,
    view_config,
)

Teachers = nn.Module | list[nn.Module | None] | None
"""What the student's stages are given: the one teacher, or one entry per ``teachers:`` entry (None
for a teacher read from its complete cache)."""


def teacher_stage(run: Run, log_tensorboard: bool = True) -> tuple[nn.Module | None, dict]:
    """The teacher: from ``teacher.model.checkpoint`` or a pretrained ``path``, reused, or trained now.

    None when it is not loaded here (``teacher_side.teacher_elsewhere``: served, or a given teacher whose
    signals all come from a complete cache); its result then comes from the server or the manifest."""
    cfg = run.cfg
    if teacher_elsewhere(cfg):
        return None, elsewhere_result(run)
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


def teachers_stage(run: Run, log_tensorboard: bool = True) -> list[tuple[nn.Module | None, dict]]:
    """Every teacher of the run, in config order: :func:`teacher_stage` on its view. A named teacher known
    by its complete own cache alone is neither trained nor loaded: ``(None, where its cache is)``."""
    out = []
    for view in teacher_views(run):
        if view.cache_only:
            out.append((None, {"from_cache": str(cache_dir(view.cfg)), "steps": 0}))
        else:
            out.append(teacher_stage(view.run, log_tensorboard))
    return out


def _check_weights(view: TeacherView) -> None:
    """The teacher of ``view`` is given or trained already, else one line naming it."""
    check_teacher_weights(view.cfg, view.name if view.named else None)


def _distill_loads(kind: str | None, cfg: Config) -> bool:
    """Whether ``distilflow distill`` loads (or asks) a teacher that ``kind`` (:func:`stand_in`) stands in
    for: a model loaded here, or a server asked for its score while its cache is written (for the manifest)."""
    return kind is None or (kind == "server" and cfg.cache.use)


def check_distill_teachers(cfg: Config) -> None:
    """``distilflow distill``, before ``open_run`` saves the config (a refused command writes nothing):
    every teacher it must load is given or trained already (one its complete cache or server stands in
    for needs neither)."""
    if not cfg.teachers:
        if stand_in(cfg, "distill") is None:
            check_teacher_weights(cfg, None)
        return
    for entry in cfg.teachers:
        view = view_config(cfg, entry, feature_teacher=entry.name == feature_teacher_name(cfg))
        if stand_in(view, "distill", own_cache=entry.cache is not None) is None:
            check_teacher_weights(view, entry.name)


def distill_teachers(run: Run) -> tuple[Teachers, dict | list[dict | None] | None]:
    """The teachers ``distilflow distill`` needs (trained already or given), loaded, and their results:
    None for one whose complete cache or server stands in for it (no teacher model is loaded then; a
    cache written now records the teacher's result). Refused before any training."""
    views = teacher_views(run)
    kinds = [stand_in(view.cfg, "distill", own_cache=view.own_cache) for view in views]
    for view, kind in zip(views, kinds):
        if kind is None:
            _check_weights(view)
    loaded = [
        teacher_stage(view.run, log_tensorboard=False) if _distill_loads(kind, view.cfg) else (None, None)
        for view, kind in zip(views, kinds)
    ]
    models, results = [m for m, _ in loaded], [r for _, r in loaded]
    return (models, results) if run.cfg.teachers else (models[0], results[0])


def cache_teachers(run: Run) -> list[tuple[TeacherView, dict]]:
    """``distilflow cache-teacher``: the cache of every teacher that reads one (the one teacher; with
    ``teachers:`` those under ``cache.use`` or naming their own ``cache``), written or finished, with
    the teachers' shared vocabulary cut. Returns each view with its manifest."""
    views = teacher_views(run)
    targets = [view for view in views if view.cached or not view.named]
    if not targets:
        raise UserError(
            "no teacher reads a cache: set cache.use=true, or give a teacher its own cache folder "
            "(teachers.<name>.cache=PATH)"
        )
    for view in targets:
        _check_weights(view)
    # The cut all teachers share, from the widths preflight measured (they do not depend on the weights).
    vocab = teachers_cut(run, new_student(run, None)) if run.cfg.teachers else None
    written = []
    for view in targets:  # one teacher at a time (load, write, free): teachers that do not fit together
        served = stand_in(view.cfg, "cache-teacher", own_cache=view.own_cache) == "server"
        served_done = served and cache_complete(view.cfg)  # a served teacher's finished cache: nothing to ask
        model, result = (None, None) if served_done else teacher_stage(view.run, log_tensorboard=False)
        written.append((view, cache_stage(view.run, model, teacher_result=result, vocab_size=vocab)))
        del model
        release_teacher(view)
    return written
