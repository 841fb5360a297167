"""Where a teacher's signals come from, for each kind of teacher (the ``TeacherSignals`` seam, teachers/base.py).

- a model here (given, or trained by this run): run on each batch (``LiveTeacher``; under torchrun with
  ``dist.shard_teacher`` sharded with the student), its features aligned with the student's;
- its cache (``cache.use``, or a named teacher's own ``cache``): written first when missing
  (:func:`cache_stage`, from the model or the server), then read with the layer pairs it holds;
- its server (``teacher.server``): top-k log-probabilities asked while the student trains, no features
  (teacher_side.served_signals);
- several teachers (``teachers:``): one member each, combined per position (teachers/multi.py).

The student's stage asks :func:`teacher_side` of every teacher view, then :func:`student_signals` once;
``distilflow cache-teacher`` (and a stage that reads a missing cache) calls :func:`cache_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distilflow.config_teachers import combination_of
from distilflow.data.cache import cache_complete, logit_width
from distilflow.data.cache_writer import ModelSignals, write_cache
from distilflow.losses.objective import Objective
from distilflow.models.taps import Taps
from distilflow.stages import Run
from distilflow.student_side import (
    configured_pairs,
    live_alignment,
    open_run_cache,
    projection_heads,
    student_taps_of,
    teacher_layer_paths,
)
from distilflow.teacher_side import served_signals, student_columns, teacher_client, teacher_outline
from distilflow.teacher_views import TeacherView, feature_index, routed, teacher_views
from distilflow.teachers.base import TeacherSignals
from distilflow.teachers.cached import OpenedCache
from distilflow.teachers.cross_tokenizer import TeacherIdsGuard, TeacherOwnIds
from distilflow.teachers.live import LiveTeacher
from distilflow.teachers.multi import Member, MultiTeacher
from distilflow.teachers.served import ServedCacheSignals
from distilflow.train import dist
from distilflow.train.loop import Task
from distilflow.train.precision import Precision, cast_teacher


def cache_stage(
    run: Run,
    teacher: nn.Module | None,
    *,
    teacher_result: dict | None = None,
    quiet: bool = False,
    vocab_size: int | None = None,
) -> dict:
    """The teacher-signal cache of this config written (or finished) from ``teacher``, or from the served
    teacher (``teacher`` None); its manifest. ``teacher_result``: the teacher's score and cost, recorded
    for runs that read the cache instead of loading the teacher; ``quiet``: no progress lines. ``run`` is
    the teacher's view with several teachers, whose shared vocabulary cut is ``vocab_size`` (None: this
    teacher's and the student's)."""
    cfg, work = run.cfg, run.work
    source = work.cache_source()
    if cfg.teacher.server is not None:  # one teacher only (teachers: entries are never served)
        student = work.new_model("student")
        vocab = vocab_size or student_columns(run, student, teacher_outline(run))
        signals: Any = ServedCacheSignals(teacher_client(cfg, top_k=cfg.cache.k), vocab_size=vocab)
        pairs, teacher_layers = [], None
    else:
        student = work.new_model("student", teacher if cfg.student.model.init_from_teacher else None)
        vocab = vocab_size or work.shared_vocab(student, teacher) or logit_width(source, teacher)
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


@dataclass
class TeacherSide:
    """What the student's stage takes from one teacher: its cache (if read), the feature layer pairs
    with both sides' taps and the projection heads (the feature teacher's; none for the others), and
    the vocabulary cut that teacher alone would set."""

    cache: OpenedCache | None
    pairs: list
    student_taps: Taps | None
    teacher_taps: Taps | None
    heads: nn.ModuleList
    vocab: int | None


def teacher_side(
    view: TeacherView,
    student: nn.Module,
    teacher: nn.Module | None,
    vocab: int | None,
    teacher_result: dict | None = None,
) -> TeacherSide:
    """One teacher (its view) as the student's stage uses it. With its cache read, the cache is written
    first when missing, from the teacher given or the served one (``vocab``: the teachers' shared cut;
    ``teacher_result`` recorded in it)."""
    served = view.cfg.teacher.server is not None
    if view.cached:
        if (teacher is not None or served) and not cache_complete(view.cfg):
            cache_stage(view.run, teacher, teacher_result=teacher_result, vocab_size=vocab)
        cached = open_run_cache(view.run, student)
        taps = student_taps_of(student, cached.pairs)
        heads = projection_heads(view.run, student, taps, cached.pairs, cached.teacher.feature_shapes())
        return TeacherSide(cached, cached.pairs, taps, None, heads, cached.vocab_size)
    if served:  # top-k log-probabilities only: no features, no teacher model here
        vocab_alone = view.run.work.shared_vocab(student, teacher_outline(view.run))
        return TeacherSide(None, [], None, None, nn.ModuleList(), vocab_alone)
    aligned = live_alignment(view.run, student, teacher)
    vocab_alone = view.run.work.shared_vocab(student, teacher)
    return TeacherSide(None, aligned.pairs, aligned.student_taps, aligned.teacher_taps, aligned.heads, vocab_alone)


def teacher_signals(
    run: Run, sides: list[TeacherSide], models: list[nn.Module | None], task, vocab: int | None, features: bool
):
    """The ``TeacherSignals`` of the student's stage: the one teacher as it is (live, cached or sharded),
    or several teachers combined per position (teachers/multi.py). A served teacher read live is set up
    by :func:`student_signals` (teacher_side.served_signals)."""
    cfg, members = run.cfg, []
    for view, side, teacher in zip(teacher_views(run), sides, models):
        if side.cache is not None:
            signals = side.cache.teacher
        else:
            # teacher.model.dtype: after init_layers copied float32 weights, before the forward passes.
            forward: Any = task
            if run.work.cross_tokenizer != "off":  # the teacher reads its own ids of each aligned row (guarded)
                forward = TeacherOwnIds(TeacherIdsGuard(run.work.tokenizer, run.work.teacher_tokenizer))
            signals = LiveTeacher(cast_teacher(teacher, view.cfg.teacher.model.dtype), forward, side.teacher_taps)
            signals = dist.current().shard_teacher_signals(signals, teacher)  # torchrun + dist.shard_teacher: FSDP2
        members.append(Member(view.name, signals))
    if not routed(cfg):
        return members[0].signals
    return MultiTeacher(
        members,
        combination=combination_of(cfg),
        temperature=cfg.distill.temperature,
        vocab_size=vocab,
        targets=task.targets,
        feature_teacher=feature_index(run) if features else None,
        autocast=Precision(cfg.student.train.precision, run.work.device).autocast,
        chunk_rows=cfg.distill.loss_chunk_rows,
    )


def student_signals(
    run: Run,
    sides: list[TeacherSide],
    models: list[nn.Module | None],
    student: nn.Module,
    task: Task,
    objective: Objective,
    width: int | None,
    *,
    features: bool,
) -> tuple[TeacherSignals, Task]:
    """The student's stage's ``TeacherSignals`` and the task it trains on: one served teacher read live
    asks its server, the task sending the next requests ahead (teacher_side.served_signals); any other
    teacher, or several, as :func:`teacher_signals` builds them (the task unchanged)."""
    if not run.cfg.teachers and run.cfg.teacher.server is not None and sides[0].cache is None:  # one served, live
        return served_signals(run, student, task, objective)  # the task sends its requests ahead
    return teacher_signals(run, sides, models, task, width, features=features), task
