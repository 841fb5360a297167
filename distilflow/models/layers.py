"""Layers by module path: the decoder stack of a causal LM, and the student/teacher layer pairs
that feature alignment (``distill.layer_map`` / ``distill.feature_layers``) aligns.

Pure torch (no transformers import): the training loop's FSDP2 wrapping and the teacher-signal
cache use it too. Paths are those of ``named_modules`` (``model.layers.3``, ``pool``), tapped with
:class:`distilflow.models.taps.Taps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from distilflow.errors import UserError

if TYPE_CHECKING:
    from distilflow.config import DistillConfig


@dataclass(frozen=True)
class LayerPair:
    """A student module whose output is aligned to a teacher module's, and the pair's weight in the loss."""

    student: str
    teacher: str
    weight: float = 1.0


def layer_pairs(distill: DistillConfig, student_layers: list[str], teacher_layers: list[str]) -> list[LayerPair]:
    """The configured layer pairs: ``distill.layer_map`` over the decoder stacks ``student_layers`` and
    ``teacher_layers`` (module paths, e.g. from :func:`decoder_layers` or a cache manifest), or the
    explicit ``distill.feature_layers``. One rule for the live teacher, the cache writer and its reader."""
    if distill.layer_map is None:
        return [LayerPair(p.student, p.teacher, p.weight) for p in distill.feature_layers]
    if not student_layers or not teacher_layers:
        role = "student" if not student_layers else "teacher"
        raise UserError(f"distill.layer_map: the {role} has no decoder layer stack; use distill.feature_layers")
    pairs = layer_map(len(student_layers), len(teacher_layers), distill.layer_map)
    return [LayerPair(student_layers[i], teacher_layers[j], 1.0) for i, j in pairs]


def decoder_layer_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks themselves ([] for a model without a decoder stack)."""
    return [model.get_submodule(path) for path in find_decoder_layers(model)]


def num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return getattr(config.get_text_config(), "num_hidden_layers", None)


def find_decoder_layers(model: nn.Module) -> list[str]:
    """Module paths of the decoder blocks, in order: ``model.layers.0`` ... or ``transformer.h.0`` ...;
    [] when the model has no such stack (a classifier).

    Found generically: the shallowest ``nn.ModuleList`` whose length is the config's
    ``num_hidden_layers`` (or, without a config, the longest one of identical blocks). Each block's
    output (first tensor of its output) is the ``(B, T, hidden)`` hidden state after that layer.
    """
    expected = num_layers(model)
    candidates = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if expected is None or len(module) == expected:
            candidates.append((path.count("."), -len(module), path, len(module)))
    if not candidates:
        return []
    _, _, path, count = min(candidates)
    return [f"{path}.{i}" for i in range(count)]


def decoder_layers(model: nn.Module) -> list[str]:
    """:func:`find_decoder_layers`, refusing a model without a decoder stack with one line."""
    paths = find_decoder_layers(model)
    if not paths:
        expected = num_layers(model)
        raise UserError(f"found no decoder layer stack (a ModuleList of {expected} blocks) in {type(model).__name__}")
    return paths


def layer_map(student_layers: int, teacher_layers: int, spec: str | list) -> list[tuple[int, int]]:
    """Pairs ``(student_layer, teacher_layer)`` for feature alignment.

    ``"uniform"``: student layer ``i`` -> teacher layer ``round((i + 1) * T / S) - 1`` with halves
    rounded up, so the last student layer maps to the last teacher layer (S=2, T=4: [(0, 1), (1, 3)]).
    A list of ``[student, teacher]`` pairs is checked and returned as tuples in the given order.
    """
    if spec == "uniform":
        # (2x + 1) // 2 rounds halves up in integers, with no float error.
        return [
            (i, ((i + 1) * teacher_layers * 2 + student_layers) // (2 * student_layers) - 1)
            for i in range(student_layers)
        ]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise UserError(f"layer map {spec!r} is not allowed; use 'uniform' or a list of [student, teacher] pairs")
    pairs = []
    for pair in spec:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, int) for x in pair):
            raise UserError(f"layer map entry {pair!r} is not a [student, teacher] pair of integers")
        student_layer, teacher_layer = pair
        if not 0 <= student_layer < student_layers:
            raise UserError(
                f"layer map student layer {student_layer} is out of range; the student has {student_layers}"
            )
        if not 0 <= teacher_layer < teacher_layers:
            raise UserError(
                f"layer map teacher layer {teacher_layer} is out of range; the teacher has {teacher_layers}"
            )
        pairs.append((student_layer, teacher_layer))
    return pairs
