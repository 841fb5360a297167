"""Reading a teacher-signal cache: the :class:`CachedTeacher` behind the ``TeacherSignals`` seam.

``open_cache`` verifies the cache against the config (see :mod:`distilflow.data.cache` for the
formats and the manifest) and gives the student stage what it would otherwise take from the teacher
model: the feature-layer pairs, projection heads sized from the cached feature shapes, and the
shared-vocabulary cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import nn

from distilflow.data.cache import (
    TENSORS,
    Batch,
    cache_dir,
    feature_pairs,
    identity,
    logit_width,
    mismatch,
    read_manifest,
    verify_shards,
)
from distilflow.data.cache_writer import write_cache
from distilflow.errors import UserError
from distilflow.losses.objective import Outputs
from distilflow.losses.sparse import SparseTeacher
from distilflow.models.heads import build_head
from distilflow.models.layers import LayerPair
from distilflow.models.taps import Taps

if TYPE_CHECKING:
    from distilflow.pipeline import Run


@dataclass
class StudentSide:
    """What the student's stage needs from the cache instead of the teacher model."""

    student_taps: Taps | None
    heads: nn.ModuleList
    pairs: list[LayerPair]
    vocab_size: int | None  # the student task's vocabulary cut (None: none)


class CachedTeacher:
    """Teacher signals read from a verified cache (a :class:`~distilflow.train.loop.TeacherSignals`).

    Each batch carries ``row`` ``(B,)``, the indices of its rows in the training set; the reader
    returns dense logits (``full``) or a :class:`SparseTeacher` in ``Outputs.logits``, and the
    cached features when asked.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], device: torch.device) -> None:
        self.folder, self.manifest, self.device = folder, manifest, device
        ident = manifest["identity"]
        self.format, self.temperature, self.samples = ident["format"], ident["temperature"], ident["samples"]
        self.starts = [s["rows"][0] for s in manifest["shards"]]
        self.files = [
            safe_open(str(folder / s["file"]), framework="pt", device="cpu")  # memory-mapped
            for s in manifest["shards"]
        ]

    def _rows(self, rows: torch.Tensor, names: list[str]) -> Batch:
        out: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for row in rows.tolist():
            shard = _bisect(self.starts, row)
            local = row - self.starts[shard]
            for name in names:
                out[name].append(self.files[shard].get_slice(name)[local : local + 1])
        return {name: torch.cat(parts).to(self.device) for name, parts in out.items()}

    def __call__(self, batch: Batch, *, features: bool) -> Outputs:
        names = list(TENSORS[self.format])
        count = len(self.manifest["identity"]["feature_pairs"]) if features else 0
        names += [f"feature.{i}" for i in range(count)]
        got = self._rows(batch["row"], names)
        if self.format == "full":
            logits: Any = got["logits"]
        elif self.format == "topk":
            logits = SparseTeacher(got["ids"].long(), got["logprobs"].float(), "topk", self.temperature)
        else:
            weights = got["counts"].float() / self.samples
            logits = SparseTeacher(got["ids"].long(), weights, "sampled", self.temperature)
        return Outputs(logits, [got[f"feature.{i}"] for i in range(count)])


def _bisect(starts: list[int], row: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= row:
            lo = mid
        else:
            hi = mid - 1
    return lo


def open_cache(run: Run, student: nn.Module, teacher: nn.Module | None) -> tuple[CachedTeacher, StudentSide]:
    """The verified cache of this config, and the student-side taps, heads and vocabulary cut.

    With ``teacher`` given, a missing or partial cache is written (or finished) first; without it
    the cache must be complete.
    """
    cfg = run.cfg
    folder = cache_dir(cfg)
    manifest = read_manifest(folder)
    if teacher is not None and not (manifest or {}).get("complete"):
        manifest = write_cache(run, teacher)
    if manifest is None or not manifest.get("complete"):
        state = "has no manifest" if manifest is None else f"is incomplete ({len(manifest['shards'])} shards)"
        raise UserError(f"teacher cache '{folder}' {state}; run 'distilflow cache-teacher' with this config first")
    stored = manifest["identity"]
    width = logit_width(run, student)
    vocab = stored["vocab_size"]
    if vocab > width or (vocab < width and not run.work.per_token):
        raise UserError(
            f"teacher cache '{folder}' holds {vocab} logit columns; the student has {width}; cache for this student"
        )
    pairs = feature_pairs(run, student, manifest.get("teacher_layers")) if cfg.cache.features else []
    problem = mismatch(folder, stored, identity(run, vocab_size=vocab, pairs=pairs))
    if problem:
        raise UserError(problem)
    verify_shards(folder, manifest)
    signals = CachedTeacher(folder, manifest, run.work.device)
    side = StudentSide(None, nn.ModuleList(), [], None if vocab == width else vocab)
    if pairs:
        side.pairs = [LayerPair(*p) for p in pairs]
        side.student_taps = Taps(student, [p.student for p in side.pairs], "student")
        side.heads = _heads(run, student, side, signals)
    return signals, side


def _heads(run: Run, student: nn.Module, side: StudentSide, signals: CachedTeacher) -> nn.ModuleList:
    """One projection head per pair, as pipeline.build_heads makes them, with teacher shapes from the cache."""
    shard = signals.files[0]
    teacher_shapes = [tuple(shard.get_slice(f"feature.{i}").get_shape()[1:]) for i in range(len(side.pairs))]
    was_training = student.training
    student.eval()
    with torch.no_grad(), side.student_taps.capture():
        run.work.forward(student, run.work.probe())
    student.train(was_training)
    student_feats = side.student_taps.features()
    torch.manual_seed(run.cfg.seed + 2)  # as build_heads: the same initial heads as a live run
    heads = nn.ModuleList()
    for pair, feat, t_shape in zip(side.pairs, student_feats, teacher_shapes):
        name = f"student '{pair.student}' -> teacher '{pair.teacher}'"
        heads.append(build_head(tuple(feat.shape[1:]), t_shape, per_token=run.work.per_token, name=name))
    return heads.to(run.work.device)
