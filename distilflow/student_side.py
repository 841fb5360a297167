"""What the student's stages set up around the student: its initial model, the feature-layer pairs
with their taps and projection heads, and the opened teacher-signal cache.

A live teacher and the cache give the same pairs (models/layers.layer_pairs) and the same initial
heads (seeded by ``seed + 2``, sized from the student's and the teacher's feature shapes; the
teacher's are read from a probe forward of the teacher, or from the cache's shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distilflow.data.cache import logit_width
from distilflow.models.build import load_weights
from distilflow.models.heads import build_heads
from distilflow.models.layers import LayerPair, layer_pairs
from distilflow.models.taps import Taps, feature_shapes
from distilflow.stages import Run
from distilflow.teachers.cached import OpenedCache, open_cache


def new_student(run: Run, teacher: nn.Module | None) -> nn.Module:
    """A fresh student (from teacher layers when configured), with ``student.model.checkpoint`` loaded if given."""
    model = run.work.new_model("student", teacher)
    if run.cfg.student.model.checkpoint:
        load_weights(model, run.cfg.student.model.checkpoint, "student")
    return model


def teacher_layer_paths(run: Run, teacher: nn.Module) -> list[str] | None:
    """The teacher's decoder-layer paths when ``distill.layer_map`` pairs them (a cache records them)."""
    return run.work.layer_paths(teacher) if run.cfg.distill.layer_map is not None else None


def configured_pairs(run: Run, student: nn.Module, teacher_layers: list[str] | None) -> list[LayerPair]:
    """The configured layer pairs, given the teacher's decoder-layer paths (a live teacher's or a cache's)."""
    return layer_pairs(run.cfg.distill, run.work.layer_paths(student), teacher_layers or [])


def student_taps_of(student: nn.Module, pairs: list[LayerPair]) -> Taps | None:
    """Forward hooks on the student's side of the layer pairs (None without pairs)."""
    return Taps(student, [p.student for p in pairs], "student") if pairs else None


def projection_heads(
    run: Run, student: nn.Module, taps: Taps | None, pairs: list[LayerPair], teacher_shapes: list[tuple[int, ...]]
) -> nn.ModuleList:
    """One projection head per layer pair, from the student's feature shapes onto the teacher's."""
    if taps is None:
        return nn.ModuleList()
    student_shapes = feature_shapes(student, taps, run.work.forward, run.work.probe())
    if run.work.cross_tokenizer != "off":  # compared per aligned group: (1, width) a side, the lengths differ
        student_shapes = [(1, shape[-1]) for shape in student_shapes]
        teacher_shapes = [(1, shape[-1]) for shape in teacher_shapes]
    torch.manual_seed(run.cfg.seed + 2)  # the same initial heads for a live and a cached teacher
    heads = build_heads(pairs, student_shapes, teacher_shapes, per_token=run.work.per_token)
    return heads.to(run.work.device)


@dataclass
class Alignment:
    """The feature term's side of a live teacher: pairs, both models' taps, the projection heads."""

    pairs: list[LayerPair]
    student_taps: Taps | None
    teacher_taps: Taps | None
    heads: nn.ModuleList


def live_alignment(run: Run, student: nn.Module, teacher: nn.Module) -> Alignment:
    """Layer pairs, student and teacher taps, and projection heads sized from the shapes on a probe batch."""
    pairs = layer_pairs(run.cfg.distill, run.work.layer_paths(student), run.work.layer_paths(teacher))
    student_taps = student_taps_of(student, pairs)
    teacher_taps = Taps(teacher, [p.teacher for p in pairs], "teacher") if pairs else None
    probe = run.work.probe("teacher")  # the teacher's own tokens of the rows
    teacher_shapes = feature_shapes(teacher, teacher_taps, run.work.forward, probe) if pairs else []
    return Alignment(
        pairs, student_taps, teacher_taps, projection_heads(run, student, student_taps, pairs, teacher_shapes)
    )


def open_run_cache(run: Run, student: nn.Module) -> OpenedCache:
    """The complete cache of this config, verified against the student (see teachers/cached.py)."""
    source = run.work.cache_source()
    aligned = run.work.cross_tokenizer != "off"  # the source runs the teacher's ids: no student width from it
    return open_cache(
        run.cfg,
        source,
        student_width=None if aligned else logit_width(source, student),
        per_token=run.work.per_token,
        pairs_for=lambda teacher_layers: configured_pairs(run, student, teacher_layers),
        device=run.work.device,
    )
