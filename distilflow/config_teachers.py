"""Config of several teachers and of the input-adaptive KD weight: the sections, the spelling rule,
and the value checks.

``teachers:`` is a list of named teachers (each trained here, loaded from ``model.checkpoint`` or
a Hugging Face ``model.hf.path``, or read from its own teacher-signal cache); ``teacher:`` stays the
one-teacher spelling, and a config gives one of the two. With ``teachers:`` the run reads
``distill.combine`` (how their signals mix: the fields of teachers/weighting.Combination),
``distill.feature_teacher`` (which teacher feature phases align with) and, optionally,
``data.teacher_column`` (a data column routing each row to one teacher). ``distill.adaptive`` (the
fields of losses/adaptive.AdaptiveKD) turns the input-adaptive KD weight on, with one teacher or
several; ``distill.label_free`` trains the student without reading a label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from distilflow.errors import UserError
from distilflow.typed_config import help_field

if TYPE_CHECKING:
    from distilflow.config import Config

_f = help_field
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ONE_TEACHER = "teacher"
"""The name of the one teacher of the ``teacher:`` spelling (in messages, routes and ``feature_teacher``)."""


@dataclass
class CombineConfig:
    """How the signals of several teachers mix into one (teachers/weighting.Combination: the same fields)."""

    rule: Literal["mean", "weights", "entropy", "correctness", "camkd"] = _f(
        "mean",
        "Per position (a sample; a token for LMs): mean = 1/N each; weights = the fixed weights; entropy = "
        "softmax(-H/tau) (the surer teacher counts more); correctness = softmax(-NLL(label)/tau) (the teacher right "
        "about the label counts more, CA-MKD's idea); camkd = (1 - softmax(NLL/tau))/(N-1), CA-MKD as published.",
    )
    weights: list[float] | None = _f(
        None, "rule weights (or fallback weights): one positive weight per teacher, in the order of teachers:."
    )
    tau: float = _f(1.0, "entropy / correctness / camkd: sharpness (> 0); small picks the best teacher, large is mean.")
    fallback: Literal["entropy", "weights", "mean"] = _f(
        "entropy", "correctness / camkd at positions without a label (unlabelled samples, prompt tokens): this rule."
    )
    confidence_temperature: float = _f(
        1.0, "Temperature (> 0) at which entropy and label NLL are measured (1: each teacher's own prediction)."
    )


@dataclass
class AdaptiveConfig:
    """The input-adaptive KD weight (losses/adaptive.AdaptiveKD: the same fields)."""

    source: Literal["entropy", "correctness"] = _f(
        "entropy", "Score per position: the teacher's entropy, or the NLL of the label (entropy where there is none)."
    )
    prefer: Literal["confident", "uncertain"] = _f(
        "confident",
        "confident: weight exp(-score/tau) (sure or right positions count more); uncertain: exp(+score/tau).",
    )
    tau: float = _f(1.0, "Sharpness (> 0) in nats; large tau gives the plain schedule.")
    confidence_temperature: float = _f(1.0, "Temperature (> 0) at which the teacher's score is measured.")


def combination_of(cfg: Config):
    """``distill.combine`` as a :class:`~distilflow.teachers.weighting.Combination` (mean when unset)."""
    from distilflow.teachers.weighting import Combination

    c = cfg.distill.combine or CombineConfig()
    weights = tuple(c.weights) if c.weights is not None else None
    return Combination(c.rule, weights, c.tau, c.fallback, c.confidence_temperature)


def adaptive_of(cfg: Config):
    """``distill.adaptive`` as :class:`~distilflow.losses.adaptive.AdaptiveKD`, or None (off)."""
    from distilflow.losses.adaptive import AdaptiveKD

    a = cfg.distill.adaptive
    return None if a is None else AdaptiveKD(a.source, a.prefer, a.tau, a.confidence_temperature)


def teacher_names(cfg: Config) -> list[str]:
    """The teachers' names in config order (``['teacher']`` for the one-teacher spelling)."""
    return [t.name for t in cfg.teachers] if cfg.teachers else [ONE_TEACHER]


def trained_sections(cfg: Config) -> list[tuple[str, Any]]:
    """``(key prefix, section)`` of every model with ``model`` and ``train`` keys: the teacher (or each
    named teacher, ``teachers.<name>``), then the student."""
    if cfg.teachers:
        teachers = [(f"teachers.{t.name or i}", t) for i, t in enumerate(cfg.teachers)]
    else:
        teachers = [(ONE_TEACHER, cfg.teacher)]
    return [*teachers, ("student", cfg.student)]


def feature_teacher_section(cfg: Config) -> Any:
    """The section (``teacher`` or one entry of ``teachers``) whose model the feature pairs align with
    (None when the config gives no teacher at all, which validation refuses)."""
    if not cfg.teachers:
        return cfg.teacher
    name = cfg.distill.feature_teacher
    return next((t for t in cfg.teachers if t.name == name), cfg.teachers[0])


def resolve_spelling(tree: dict, teacher_given: bool) -> None:
    """The one-teacher spelling and the list are exclusive: with ``teachers:`` the defaults' ``teacher:``
    section is dropped (None), and a ``teacher:`` the user gave too (``teacher_given``) is refused."""
    if tree.get("teachers") is None:
        return
    entries = tree["teachers"] if isinstance(tree["teachers"], list) else []
    served = [e.get("name") or str(i) for i, e in enumerate(entries) if isinstance(e, dict) and "server" in e]
    if served:  # the served path (teachers/served.py) reads one teacher's top-k; combining them is not built
        raise UserError(
            f"config key 'teachers.{served[0]}.server': a teacher served by vLLM is supported with 'teacher:' only "
            "(one teacher); with 'teachers:' every teacher runs in this process or is read from its own cache "
            "(teachers.<name>.cache)"
        )
    if teacher_given:
        raise UserError(
            "config keys 'teacher' and 'teachers' are both given; use 'teacher:' for one teacher or 'teachers:' "
            "for several named ones (override one of them with teachers.<name>.<key>=value)"
        )
    tree["teacher"] = None


def check_teachers(cfg: Config, need: Any) -> None:
    """The rules of several teachers, the adaptive KD weight and label-free runs (config_checks.validate)."""
    d = cfg.distill
    need(
        (cfg.teacher is None) != (cfg.teachers is None),
        "teachers",
        cfg.teachers,
        "give 'teacher:' (one teacher) or 'teachers:' (a list of named teachers), exactly one of them",
    )
    if cfg.teachers is not None:
        _check_list(cfg, need)
    else:
        need(d.combine is None, "distill.combine", "given", "is read with 'teachers:' only (one teacher mixes nothing)")
        need(
            cfg.data.teacher_column is None,
            "data.teacher_column",
            cfg.data.teacher_column,
            "routes rows to one of several named teachers; it needs 'teachers:'",
        )
    names = teacher_names(cfg)
    need(
        d.feature_teacher is None or d.feature_teacher in names,
        "distill.feature_teacher",
        d.feature_teacher,
        f"names no teacher; the teachers are {', '.join(names)}",
    )
    uses_features = any("feature" in p.terms for p in d.phases)
    need(
        not (uses_features and len(names) > 1 and d.feature_teacher is None),
        "distill.feature_teacher",
        None,
        f"a phase uses the 'feature' term with {len(names)} teachers; name the one to align with ({', '.join(names)})",
    )
    if d.adaptive is not None:
        try:
            adaptive_of(cfg).check()
        except UserError as error:
            raise UserError(f"config key 'distill.adaptive': {error}") from None
        need(
            not (cfg.cache.use and cfg.cache.format == "sampled"),
            "distill.adaptive",
            "given",
            "a sampled cache holds drawn ids, not the teacher's distribution whose entropy the weight reads; "
            "use cache.format=topk or full",
        )
    _check_label_free(cfg, need)


def _check_list(cfg: Config, need: Any) -> None:
    teachers = cfg.teachers
    need(len(teachers) >= 1, "teachers", teachers, "list one or more named teachers")
    names = [t.name for t in teachers]
    for i, name in enumerate(names):
        need(
            bool(NAME.fullmatch(name)),
            f"teachers[{i}].name",
            name,
            "name each teacher: letters, digits, '_', '.', '-' (it names a folder and a route value)",
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    need(not twice, "teachers", names, f"teacher names must be unique ({', '.join(twice)} given twice)")
    try:
        combination_of(cfg).check(len(teachers))
    except UserError as error:
        raise UserError(f"config key 'distill.combine': {error}") from None
    several = len(teachers) > 1 or cfg.data.teacher_column is not None
    c = cfg.cache
    reads_cache = c.use or any(t.cache for t in teachers)
    need(
        not (several and reads_cache and c.format == "sampled"),
        "cache.format",
        c.format,
        "several teachers combine full or topk caches only (sampled ids cannot be weighed against each other)",
    )
    refusals = [
        (cfg.reasoning.task != "off", "reasoning.task", cfg.reasoning.task, "the reasoning demo has one teacher"),
        (
            cfg.on_policy.lmbda > 0,
            "on_policy.lmbda",
            cfg.on_policy.lmbda,
            "on-policy sampling is not wired for several teachers yet; use 'teacher:' or on_policy.lmbda=0",
        ),
        (
            cfg.dist.shard_teacher,
            "dist.shard_teacher",
            True,
            "sharding several teachers is not supported; read the large ones from their caches (cache.use)",
        ),
        (
            bool(cfg.student.model.init_from_teacher),
            "student.model.hf.init_layers",
            cfg.student.model.init_from_teacher,
            "copies the layers of one teacher; with 'teachers:' the student starts from its own init",
        ),
    ]
    if cfg.task == "causal_lm":
        refusals += [
            (
                cfg.distill.cross_tokenizer in ("uld", "hybrid"),
                "distill.cross_tokenizer",
                cfg.distill.cross_tokenizer,
                "several teachers read the student's tokens (one tokenizer for all); use auto or off",
            ),
            (
                bool(cfg.data.token_rows.teacher_tokenizer),
                f"data.{cfg.data.source}.teacher_tokenizer",
                cfg.data.token_rows.teacher_tokenizer,
                "several teachers share the student's tokenizer (each folder's is checked against it)",
            ),
        ]
    for refused, key, value, why in refusals:
        need(not refused, key, value, f"not with 'teachers:'; {why}")
    column = cfg.data.teacher_column
    need(
        column is None or cfg.data.source in ("text", "npz", "csv"),
        "data.teacher_column",
        column,
        f"data.source '{cfg.data.source}' has no columns; routing reads data.source text, npz or csv",
    )
    need(column is None or bool(column), "data.teacher_column", column, "name the column (e.g. teacher)")


def _check_label_free(cfg: Config, need: Any) -> None:
    d = cfg.distill
    if not d.label_free:
        return
    with_ce = [p.name for p in d.phases if "ce" in p.terms]
    need(not with_ce, "distill.phases", with_ce, "a label-free student has no 'ce' term; drop it from these phases")
    if cfg.teachers and d.combine is not None:
        need(
            d.combine.rule not in ("correctness", "camkd"),
            "distill.combine.rule",
            d.combine.rule,
            "reads labels, and a label-free run has none; use entropy (the same rule with the label unknown)",
        )
    need(
        d.adaptive is None or d.adaptive.source != "correctness",
        "distill.adaptive.source",
        "correctness",
        "reads labels, and a label-free run has none; use entropy",
    )
