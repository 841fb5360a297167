"""Writing the teacher-signal cache: the teacher (here, or served) over the training rows, shard by shard.

Formats, the manifest and the checks that decide whether a cache fits a run are in
distilflow/data/cache.py; this module runs the teacher and writes. Each shard is written to a
temporary file and renamed, and only then listed in the manifest, so a killed write resumes at the
first shard that is not listed (byte-identical: sampling is seeded per shard); a full disk stops it
with one line and the shards written before stay listed (distilflow/storage.py). Under torchrun rank r
writes shards r, r + N, ... and lists them in its own part; rank 0 merges the parts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from distilflow.data.cache import (
    ALIGNED_TENSORS,
    BYTES_PER_ENTRY,
    MANIFEST,
    RANK_PART,
    TENSORS,
    Batch,
    CacheSource,
    cache_dir,
    identity,
    mismatch,
    read_manifest,
    sha256_files,
    teacher_files,
    verify_shards,
)
from distilflow.errors import UserError
from distilflow.models.layers import LayerPair
from distilflow.models.taps import Taps
from distilflow.storage import remove_stale_temps
from distilflow.train import dist
from distilflow.train.checkpoint import write_json, write_weights
from distilflow.train.precision import cast_teacher

if TYPE_CHECKING:
    from distilflow.config import Config

# --- writing ---------------------------------------------------------------------------------


def encode(logits: torch.Tensor, *, fmt: str, k: int, samples: int, temperature: float, generator) -> Batch:
    """Signals of one micro-batch. ``logits`` ``(..., V)`` -> tensors ``(..., V | k | samples)``."""
    if fmt == "full":
        return {"logits": logits.float()}
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (..., V)
    if fmt == "topk":
        values, ids = logprobs.topk(k, dim=-1)  # (..., k), largest first
        return {"logprobs": values.half(), "ids": ids.int()}
    flat = logprobs.exp().reshape(-1, logprobs.shape[-1])  # (M, V)
    drawn = torch.multinomial(flat, samples, replacement=True, generator=generator)  # (M, n)
    ids, counts = merge_draws(drawn)
    shape = (*logprobs.shape[:-1], samples)
    return {"ids": ids.int().reshape(shape), "counts": counts.to(torch.uint8).reshape(shape)}


def aligned_tensors(source: CacheSource, fmt: str) -> tuple[str, ...]:
    """The shard keys a cache across tokenizers adds to ``TENSORS[fmt]`` (none for one tokenizer)."""
    if not source.next_ids:
        return ()
    return ALIGNED_TENSORS + (("next_logprobs",) if fmt == "topk" else ())


def next_token_logprobs(logits: torch.Tensor, following: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / T)`` at the token that follows each position: ``(B, T, V)``, ``(B, T)`` ->
    ``(B, T)`` float32."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, following[..., None].long())[..., 0] - torch.logsumexp(scaled, dim=-1)


def merge_draws(drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, n)`` draws -> distinct ids and their counts ``(M, n)``, left-aligned; padding is id 0, count 0."""
    ordered, _ = drawn.sort(dim=-1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.long().cumsum(-1) - 1  # (M, n): which distinct id each draw belongs to
    counts = torch.zeros_like(ordered).scatter_add_(1, slot, torch.ones_like(ordered))
    ids = torch.zeros_like(ordered).scatter_(1, slot, ordered)
    return ids, counts


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


class CacheSignals(Protocol):
    """What one micro-batch's cached tensors come from: the teacher model here (:class:`ModelSignals`) or
    a served teacher (distilflow/teachers/served.py). ``device``: where the batch's rows are moved first."""

    device: torch.device

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch: ...


class ModelSignals:
    """The teacher model run on each micro-batch (eval mode, ``teacher.model.dtype`` as the live teacher
    runs), with the features of the cached layer pairs; its logits cut to ``vocab_size`` and encoded."""

    def __init__(self, cfg: Config, source: CacheSource, teacher: nn.Module, *, vocab_size: int, pairs: list) -> None:
        self.cfg, self.source, self.vocab_size = cfg, source, vocab_size
        self.teacher = cast_teacher(teacher.eval(), cfg.teacher.model.dtype)
        self.device = next(self.teacher.parameters()).device
        self.taps = Taps(self.teacher, [p.teacher for p in pairs], "teacher") if pairs else None

    @torch.no_grad()
    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        c = self.cfg.cache
        if self.taps is not None:
            with self.taps.capture():
                logits = self.source.forward(self.teacher, batch)
            features = self.taps.features()
        else:
            logits, features = self.source.forward(self.teacher, batch), []
        logits = logits[..., : self.vocab_size]  # the shared-vocabulary cut (a no-op when sizes agree)
        out = encode(
            logits,
            fmt=c.format,
            k=c.k,
            samples=c.samples,
            temperature=self.cfg.distill.temperature,
            generator=generator,
        )
        source = self.source
        if source.next_ids:  # across tokenizers: the alignment the signals belong to, per teacher position
            out["teacher_ids"] = batch[source.next_ids].int()  # (B, T_t)
            out["teacher_group"] = batch["teacher_group"].int()
            if c.format == "topk":  # and log p_T of each actual next teacher token (what a span's merge needs)
                following = batch[source.next_ids][:, 1 : logits.shape[1] + 1]  # (B, T_t - 1)
                out["next_logprobs"] = next_token_logprobs(logits, following, self.cfg.distill.temperature)
        for i, feature in enumerate(features):
            out[f"feature.{i}"] = feature.float()
        return out


def write_cache(
    cfg: Config,
    source: CacheSource,
    signals: CacheSignals,
    *,
    vocab_size: int,
    pairs: list[LayerPair],
    teacher_layers: list[str] | None,
    teacher_result: dict[str, Any] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write the cache of ``signals`` over the source's rows; resume a partial one.

    ``vocab_size``: the logit columns kept (the shared-vocabulary cut); ``pairs``: the layer pairs whose
    teacher features are cached (with ``cache.features``); ``teacher_layers``: the teacher's decoder
    layers, recorded for ``distill.layer_map`` (a reader pairs them without the teacher model);
    ``teacher_result``: the teacher's score and cost, recorded for runs that read the cache instead of
    loading the teacher. Returns the manifest. Refuses a folder holding a cache of another config.
    """
    c = cfg.cache
    if source.next_ids and c.format == "sampled":  # checked before anything is written
        raise UserError("cache.format sampled: across tokenizers the cache holds top-k or full signals; use topk")
    folder = cache_dir(cfg)
    pairs = pairs if c.features else []
    ident = identity(cfg, source, vocab_size=vocab_size, pairs=pairs)
    vocab = vocab_size
    manifest = read_manifest(folder)
    if manifest is not None:
        problem = mismatch(folder, manifest["identity"], ident)
        if problem:
            raise UserError(problem)
        if manifest.get("complete"):
            verify_shards(folder, manifest)
            return manifest
    describe, _ = teacher_files(cfg)
    done = {s["file"]: s for s in (manifest or {}).get("shards", [])}
    done.update(_rank_parts(folder))  # listed by the ranks of an interrupted torchrun job (any world size)
    world = dist.current()
    if world.is_main:
        remove_stale_temps(folder)  # of a shard or manifest write that a kill cut short
    world.barrier("reading the teacher cache")  # every rank has read the parts before one is rewritten
    part = folder / (RANK_PART.format(rank=world.rank) if world.distributed else MANIFEST)
    manifest = {
        "identity": ident,
        "teacher": describe,
        "complete": False,
        "teacher_layers": teacher_layers,
        "teacher_result": teacher_result,
        "bytes_per_position": sum(
            BYTES_PER_ENTRY[name] * (vocab if c.format == "full" else c.k if c.format == "topk" else c.samples)
            for name in TENSORS[c.format]
        )
        + sum(BYTES_PER_ENTRY[name] for name in aligned_tensors(source, c.format)),
        "shards": [],
    }
    rows = source.rows
    total = ident["rows"]
    micro = max(cfg.student.train.batch_size // cfg.student.train.grad_accum, 1)
    began = last_print = time.monotonic()
    starts = list(range(0, total, c.shard_rows))
    for index, start in enumerate(starts):
        if index % world.size != world.rank:  # under torchrun each rank writes every world-size-th shard
            continue
        name, stop = _shard_name(index), min(start + c.shard_rows, total)
        listed = done.get(name)
        if listed is not None and listed["rows"] == [start, stop] and _shard_ok(folder / name, listed):
            manifest["shards"].append(listed)
            continue
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + index)
        pieces: dict[str, list[torch.Tensor]] = {}
        for lo in range(start, stop, micro):
            batch = {key: value[lo : min(lo + micro, stop)].to(signals.device) for key, value in rows.items()}
            for key, value in signals(batch, generator).items():
                pieces.setdefault(key, []).append(value.cpu())
        tensors = {key: torch.cat(parts).contiguous() for key, parts in pieces.items()}
        path = folder / name
        write_weights(path, tensors, {"rows": f"{start}:{stop}"})  # tmp file + rename
        manifest["shards"].append(
            {"file": name, "rows": [start, stop], "bytes": path.stat().st_size, "sha256": sha256_files([path])}
        )
        write_json(part, manifest)
        if not quiet and world.is_main and (time.monotonic() - last_print > 10 or index + 1 == len(starts)):
            last_print = time.monotonic()
            print(
                f"cache-teacher: shard {index + 1}/{len(starts)} (rows {start}-{stop}) "
                f"{time.monotonic() - began:.1f} s",
                file=sys.stderr,
            )
    if world.distributed:  # one manifest lists the shards of this job's ranks, in row order
        write_json(part, manifest)  # also a rank that had no shard: no older part of that name is read
        world.barrier("writing the teacher cache")
        parts = _rank_parts(folder, ranks=world.size)
        manifest["shards"] = sorted(parts.values(), key=lambda shard: shard["rows"][0])
    manifest["complete"] = True
    if world.is_main:
        write_json(folder / MANIFEST, manifest)
        for stale in folder.glob(RANK_PART.format(rank="*")):
            stale.unlink()
    world.barrier("writing the teacher manifest")
    return manifest


def _rank_parts(folder: Path, ranks: int | None = None) -> dict[str, dict[str, Any]]:
    """Shards listed in the rank parts of a torchrun job (finished or interrupted), by file name;
    ``ranks``: only those of ranks 0 .. ranks - 1 (this job's), else every part found."""
    shards: dict[str, dict[str, Any]] = {}
    paths = folder.glob(RANK_PART.format(rank="*"))
    if ranks:
        paths = [folder / RANK_PART.format(rank=r) for r in range(ranks)]
    for path in sorted(paths):
        if not path.is_file():
            continue
        try:
            shards.update({s["file"]: s for s in json.loads(path.read_text())["shards"]})
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a part cut by a kill: its shards are written again
    return shards


def _shard_ok(path: Path, shard: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == shard["bytes"] and sha256_files([path]) == shard["sha256"]
