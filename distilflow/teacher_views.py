"""The teachers of a run, each seen as the one teacher of a run of its own (a *view*).

Every stage that reads a teacher (train or load it, write or open its cache, align features with
it) was built for the one-teacher spelling ``teacher:``. With ``teachers:`` each named teacher gets
a view: the run's config with that teacher as ``teacher:``, its own folder and its own cache, and
the run's workload (same data, tokenizer and device) building that teacher. The stages then run
unchanged on each view:

- folder ``<run_dir>/teachers/<name>/`` (a teacher trained here: ``teacher/model.safetensors``
  there, its training log in that folder's ``metrics.jsonl``);
- cache: the teacher's ``cache`` folder, else ``<cache.path>/<name>`` when ``cache.path`` is set,
  else ``<run_dir>/teachers/<name>/teacher_cache``; read when ``cache.use`` is on or the teacher
  names its own ``cache``;
- features (``cache.features``, the layer pairs) only for ``distill.feature_teacher``.

With ``teacher:`` there is one view, named ``teacher``, and it is the run itself.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from distilflow.config import Config, NamedTeacherConfig
from distilflow.config_teachers import ONE_TEACHER
from distilflow.data.cache import cache_complete, cache_dir, logit_width, read_manifest, reads_cache
from distilflow.errors import UserError
from distilflow.stages import Run, has_weights
from distilflow.teacher_side import shared_vocab_of


@dataclass
class TeacherView:
    """One teacher of a run: its ``name``, its place in ``teachers:`` and its ``run`` (the view)."""

    name: str
    index: int
    run: Run
    named: bool = False  # an entry of ``teachers:`` (False: the one teacher of ``teacher:``, the run itself)
    own_cache: bool = False  # the teacher names its own cache folder (``teachers[i].cache``)
    width: int | None = None  # its logit columns, once preflight has measured them (teacher_width)

    @property
    def cfg(self) -> Config:
        return self.run.cfg

    @property
    def cached(self) -> bool:
        """Distillation reads this teacher's signals from its cache instead of running it."""
        return self.cfg.cache.use

    @property
    def given(self) -> bool:
        """Its weights are given (``model.checkpoint`` or a Hugging Face folder), not trained here."""
        return bool(self.cfg.teacher.model.pretrained)

    @property
    def cache_only(self) -> bool:
        """A teacher known by its complete own cache alone: nothing to train or load for distillation."""
        return known_by_cache(self.cfg, own_cache=self.own_cache)


def view_config(cfg: Config, entry: NamedTeacherConfig, *, feature_teacher: bool) -> Config:
    """The run's config with ``entry`` as its one teacher, in its own folder, reading its own cache, with
    its own ``seed`` when it gives one."""
    folder = cfg.run_dir / "teachers" / entry.name
    if entry.cache:
        path = entry.cache
    elif cfg.cache.path:
        path = str(Path(cfg.cache.path).expanduser() / entry.name)
    else:
        path = None  # <folder>/teacher_cache
    cache = dataclasses.replace(
        cfg.cache,
        use=cfg.cache.use or entry.cache is not None,
        path=path,
        features=cfg.cache.features and feature_teacher,
    )
    distill = dataclasses.replace(
        cfg.distill,
        combine=None,
        feature_teacher=None,
        feature_layers=cfg.distill.feature_layers if feature_teacher else [],
        layer_map=cfg.distill.layer_map if feature_teacher else None,
    )
    seed = cfg.seed if entry.seed is None else entry.seed
    return dataclasses.replace(
        cfg, seed=seed, teacher=entry.as_teacher(), teachers=None, output_dir=str(folder), cache=cache, distill=distill
    )


def teacher_views(run: Run) -> list[TeacherView]:
    """The run's teachers as views, in config order (made once per run and kept on it)."""
    if run.views:
        return run.views
    cfg = run.cfg
    if not cfg.teachers:
        run.views = [TeacherView(ONE_TEACHER, 0, run)]
        return run.views
    views = []
    for index, entry in enumerate(cfg.teachers):
        view = view_config(cfg, entry, feature_teacher=entry.name == feature_teacher_name(cfg))
        run_view = Run(view, run.work.with_teacher(view))
        views.append(TeacherView(entry.name, index, run_view, named=True, own_cache=entry.cache is not None))
    run.views = views
    return views


def feature_teacher_name(cfg: Config) -> str:
    """The teacher feature phases align with: ``distill.feature_teacher``, else the first (or only) one."""
    if not cfg.teachers:
        return ONE_TEACHER
    return cfg.distill.feature_teacher or cfg.teachers[0].name


def feature_index(run: Run) -> int:
    """The index of :func:`feature_teacher_name` among the views."""
    name = feature_teacher_name(run.cfg)
    return next(v.index for v in teacher_views(run) if v.name == name)


def routed(cfg: Config) -> bool:
    """Whether the run combines teachers (several, or routed by a data column) rather than using one as is."""
    return bool(cfg.teachers) and (len(cfg.teachers) > 1 or cfg.data.teacher_column is not None)


def teacher_width(view: TeacherView, model: nn.Module | None) -> int:
    """The logit columns ``view``'s teacher gives: its model's on a probe row, else its cache's."""
    if model is not None:
        return logit_width(view.run.work.cache_source(), model)
    manifest = read_manifest(cache_dir(view.cfg))
    if manifest is None:
        raise UserError(f"teacher '{view.name}' has neither a model nor a cache in '{cache_dir(view.cfg)}'")
    return int(manifest["identity"]["vocab_size"])


def common_width(
    views: Sequence[TeacherView], widths: Sequence[int], *, student_width: int, per_token: bool
) -> int | None:
    """The label space or vocabulary every teacher and the student score: None when all give the
    student's width, else (LMs over one tokenizer whose embedding tables differ in size) the shared
    cut. Teachers that disagree otherwise are refused in one line."""
    named = ", ".join(f"{v.name} {w}" for v, w in zip(views, widths))
    if not per_token:  # classifiers: one label space
        if any(w != student_width for w in widths):
            raise UserError(
                f"teachers score different label spaces ({named}; the student {student_width} classes); every "
                "teacher must predict the classes of data.source"
            )
        return None
    cut = min([student_width, *widths])
    for view, width in zip(views, widths):
        if view.cached and width != cut:  # its stored columns (or top-k ids) reach past the shared ones
            raise UserError(
                f"teacher '{view.name}': its cache holds {width} vocabulary ids but the teachers and the student "
                f"share {cut} ({named}); write its cache with this config ('distilflow cache-teacher')"
            )
    return None if cut == student_width and all(w == cut for w in widths) else cut


def student_vocab(run: Run, student: nn.Module, teachers: Sequence[nn.Module | None]) -> int | None:
    """The logit columns the student is trained and scored on (None: all of them). One teacher: the ids
    it shares with the student (``Workload.shared_vocab``); several: the cut they all share, checked
    (:func:`common_width`; a teacher read from its cache gives its cache's width)."""
    views = teacher_views(run)
    if not run.cfg.teachers:
        if teachers[0] is None and run.work.per_token:  # an LM teacher's complete cache's manifest or served outline
            return shared_vocab_of(run, student, None)
        return run.work.shared_vocab(student, teachers[0])
    widths = [teacher_width(view, teacher) for view, teacher in zip(views, teachers)]
    student_width = logit_width(run.work.cache_source(), student)
    return common_width(views, widths, student_width=student_width, per_token=run.work.per_token)


# --- what stands in for a teacher's model ---------------------------------------------------------------


def known_by_cache(cfg: Config, *, own_cache: bool) -> bool:
    """Whether the teacher of ``cfg`` (a view's config) is known by its complete own cache alone: it names its
    own ``cache`` folder (``own_cache``), its weights are neither given nor trained in its folder."""
    given = bool(cfg.teacher.model.pretrained)
    return own_cache and not given and not has_weights(cfg.run_dir / "teacher") and cache_complete(cfg)


def stand_in(cfg: Config, command: str, *, own_cache: bool = False) -> str | None:
    """What stands in for the model of the teacher of ``cfg`` (the run's config, or a view's for one of
    ``teachers:``, ``own_cache`` when it names its own cache folder) in ``command`` ("distill", "eval" or
    "cache-teacher"), so that its model is not built or loaded there:

    - "cache": its complete cache. Every command: a named teacher known by its own cache alone
      (:func:`known_by_cache`); ``distill`` also: a teacher whose signals are all read from a complete
      cache (``data.cache.reads_cache``). ``eval`` scores models and ``cache-teacher`` writes caches, so
      there a cache stands in only for a teacher that has no model at all.
    - "server": ``teacher.server`` (one teacher only), asked for its log-probabilities and its score.
    - None: its model is loaded here, given or trained already (:func:`check_teacher_weights`).
    """
    if known_by_cache(cfg, own_cache=own_cache) or (command == "distill" and reads_cache(cfg)):
        return "cache"
    return "server" if cfg.teacher.server is not None else None


def check_teacher_weights(cfg: Config, name: str | None) -> None:
    """The teacher of ``cfg`` (a view's config for teacher ``name``) is given or trained already, else one line."""
    folder = cfg.run_dir / "teacher"
    if not cfg.teacher.model.pretrained and not has_weights(folder):
        which = f"teacher '{name}'" if name else "trained teacher"
        key = f"teachers.{name}.model" if name else "teacher.model"
        raise UserError(
            f"no {which} in '{folder}'; run 'distilflow train-teacher' with this config "
            f"first, or set {key}.checkpoint=PATH (or {key}.hf.path for a Hugging Face folder)"
        )


def release_teacher(view: TeacherView) -> None:
    """Free the view's loaded teacher (the workload keeps a model folder it read) once the caller holds
    it no more: the next teacher can use its memory (``cache-teacher``, one teacher at a time)."""
    view.run.work.release_teacher()
    gc.collect()  # a model whose modules refer to each other is freed by the collector, not the count


def measured_width(view: TeacherView, teacher: nn.Module | None) -> int:
    """:func:`teacher_width`, kept on the view (widths do not depend on the weights): later stages read it
    there instead of building that teacher again, or every teacher at once."""
    view.width = teacher_width(view, teacher)
    return view.width


def teachers_cut(run: Run, student: nn.Module) -> int | None:
    """:func:`student_vocab` of several teachers from their widths, each teacher built alone where
    preflight did not measure it (and released before the next), so no two are ever loaded together."""
    views = teacher_views(run)
    widths = []
    for view in views:
        if view.width is None:
            teacher = None if view.cache_only else view.run.work.new_model("teacher")
            measured_width(view, teacher)
            del teacher
            release_teacher(view)
        widths.append(view.width)
    student_width = logit_width(run.work.cache_source(), student)
    return common_width(views, widths, student_width=student_width, per_token=run.work.per_token)
