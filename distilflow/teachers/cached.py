"""A teacher whose signals come from the teacher-signal cache (``cache.use``): open it, verified, and read it.

:func:`open_cache` checks the cache at ``cache.path`` against the config and the student (see
:mod:`distilflow.data.cache` for the formats and the manifest; distilflow/data/cache_writer.py
writes it) and gives the student stage what it would otherwise take from the teacher model: the
feature-layer pairs, the teacher feature shapes the projection heads map onto, and the
shared-vocabulary cut. :class:`CachedTeacher` is the ``TeacherSignals`` that reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from distilflow.data.cache import (
    ALIGNED_TENSORS,
    TENSORS,
    CacheSource,
    cache_dir,
    identity,
    mismatch,
    read_manifest,
    shard_path,
    verify_shards,
)
from distilflow.errors import UserError
from distilflow.losses.objective import Outputs
from distilflow.losses.sparse import SparseTeacher
from distilflow.losses.uld import TopkTeacher
from distilflow.models.layers import LayerPair
from distilflow.teachers.base import Batch

if TYPE_CHECKING:
    from distilflow.config import Config


class CachedTeacher:
    """Teacher signals read from a verified cache (a :class:`~distilflow.teachers.base.TeacherSignals`).

    Each batch carries ``row`` ``(B,)``, the indices of its rows in the training set; the reader
    returns dense logits (``full``) or a :class:`SparseTeacher` in ``Outputs.logits``, and the
    cached features when asked.
    """

    autocast = False  # stored tensors are only moved; autocast would try to "promote" the fp16 ones

    def __init__(self, folder: Path, manifest: dict[str, Any], device: torch.device) -> None:
        self.folder, self.manifest, self.device = folder, manifest, device
        ident = manifest["identity"]
        self.format, self.temperature, self.samples = ident["format"], ident["temperature"], ident["samples"]
        self.starts = [s["rows"][0] for s in manifest["shards"]]
        self.files = [_open_shard(shard_path(folder, s["file"])) for s in manifest["shards"]]

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
        if self.manifest["identity"].get("cross_tokenizer"):
            names += [*ALIGNED_TENSORS, *(["next_logprobs"] if self.format == "topk" else [])]
            got = self._rows(batch["row"], names)
            return Outputs(self._aligned(batch, got))
        got = self._rows(batch["row"], names)
        if self.format == "full":
            logits: Any = got["logits"]
        elif self.format == "topk":
            logits = SparseTeacher(got["ids"].long(), got["logprobs"].float(), "topk", self.temperature)
        else:
            weights = got["counts"].float() / self.samples
            logits = SparseTeacher(got["ids"].long(), weights, "sampled", self.temperature)
        return Outputs(logits, [got[f"feature.{i}"] for i in range(count)])

    def _aligned(self, batch: Batch, got: Batch) -> torch.Tensor | TopkTeacher:
        """Signals of a teacher of another tokenizer, after checking that the cached rows hold this batch's
        alignment (the teacher's ids and groups it was written for)."""
        for cached, column in (("teacher_ids", "teacher_input_ids"), ("teacher_group", "teacher_group")):
            if not torch.equal(got[cached].long(), batch[column].long()):
                raise UserError(
                    f"teacher cache '{self.folder}' holds other teacher rows than this batch's ({column} differs); "
                    "run 'distilflow cache-teacher' again with this config"
                )
        if self.format == "full":
            return got["logits"]
        vocab = self.manifest["identity"]["vocab_size"]
        return TopkTeacher(
            got["ids"].long(), got["logprobs"].float(), got["next_logprobs"].float(), self.temperature, vocab
        )

    def feature_shapes(self) -> list[tuple[int, ...]]:
        """Per-row shapes of the cached teacher features, in the order of the layer pairs."""
        pairs = self.manifest["identity"]["feature_pairs"]
        return [tuple(self.files[0].get_slice(f"feature.{i}").get_shape()[1:]) for i in range(len(pairs))]


def _open_shard(path: Path) -> Any:
    """A shard memory-mapped by safetensors (a header and raw tensors: nothing in it is executed)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:  # safetensors raises SafetensorError (and OSError) for files that are not its own
        raise UserError(
            f"teacher cache shard '{path}' is not a readable safetensors file ({error}); delete the folder and "
            "run 'distilflow cache-teacher' again"
        ) from None


def _bisect(starts: list[int], row: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= row:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class OpenedCache:
    """A verified cache and what the student's stage takes from it instead of the teacher model."""

    teacher: CachedTeacher
    pairs: list[LayerPair]  # the feature-layer pairs (empty without cache.features)
    vocab_size: int | None  # the student task's vocabulary cut (None: none)


def open_cache(
    cfg: Config,
    source: CacheSource,
    *,
    student_width: int | None,
    per_token: bool,
    pairs_for: Callable[[list[str] | None], list[LayerPair]],
    device: torch.device,
) -> OpenedCache:
    """The complete, verified cache of this config for a student with ``student_width`` logit columns
    (None across tokenizers: the teacher's vocabulary is its own, no columns are cut).

    ``pairs_for(teacher_layers)``: the configured layer pairs given the teacher's decoder-layer paths
    recorded in the manifest (the teacher model is not needed). Refuses, with one line, a missing or
    incomplete cache, one made for another config, teacher or student, and a damaged shard.
    """
    folder = cache_dir(cfg)
    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete"):
        state = "has no manifest" if manifest is None else f"is incomplete ({len(manifest['shards'])} shards)"
        raise UserError(f"teacher cache '{folder}' {state}; run 'distilflow cache-teacher' with this config first")
    stored = manifest["identity"]
    vocab = stored["vocab_size"]
    if student_width is not None and (vocab > student_width or (vocab < student_width and not per_token)):
        raise UserError(
            f"teacher cache '{folder}' holds {vocab} logit columns; the student has {student_width}; "
            "cache for this student"
        )
    pairs = pairs_for(manifest.get("teacher_layers")) if cfg.cache.features else []
    problem = mismatch(folder, stored, identity(cfg, source, vocab_size=vocab, pairs=pairs))
    if problem:
        raise UserError(problem)
    verify_shards(folder, manifest)
    cut = None if student_width is None or vocab == student_width else vocab
    return OpenedCache(CachedTeacher(folder, manifest, device), pairs, cut)
