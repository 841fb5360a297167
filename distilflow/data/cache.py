"""Teacher-signal cache: the teacher runs once over the training rows; distillation reads its outputs.

``distilflow cache-teacher`` writes ``<cache.path>/shard-NNNNN.safetensors`` (``cache.shard_rows``
rows each) and ``manifest.json``. A shard is written to a temporary file and renamed, and the
manifest lists a shard only after its rename, so an interrupted write never leaves half a shard
that a reader would take: the next run skips the listed shards and continues. Shards of one
config are byte-identical whether written in one go or resumed (sampling draws are seeded per shard).

What a row stores, per position (a sample for classifiers; each shifted token for LMs):

- ``full``: ``logits`` ``(..., V)`` in float32: classifiers and small vocabularies, where 4 bytes
  per entry is cheap and float32 makes cached distillation equal to the live teacher (fp16 would
  round every logit by up to 2^-11 relative; large vocabularies use ``topk`` or ``sampled``).
- ``topk``: ``logprobs`` ``(..., k)`` float16, the teacher's largest log-probabilities at the
  distillation temperature, and their ``ids`` int32: 6 bytes per id. The tail mass is
  ``1 - sum(exp(logprobs))``.
- ``sampled``: ``samples`` ids drawn with replacement from the teacher's distribution at the
  temperature (Anshumann et al. 2025, "Sparse Logit Sampling"), duplicates merged: ``ids`` int32
  and ``counts`` uint8 ``(..., samples)`` (a slot with count 0 is padding): 5 bytes per draw. The
  importance weight of an id is ``count / samples`` (the proposal is the target, so weights are
  counts): an unbiased estimate of the teacher distribution.
- ``cache.features``: the tapped teacher features of the configured layer pairs (``feature.N``,
  float32, shape per row as the teacher produces it).

The manifest records what the signals depend on (teacher weight files, or a served teacher's name
and its folder's config.json; tokenizer, training rows, seq_len, format, k, samples, seed,
temperature, feature pairs); a reader whose config expects anything else is refused with one line,
as is a missing, truncated or altered shard. Beside the identity it keeps the teacher's score and
cost (``teacher_result``), so that a run reading a complete cache never loads a given teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distilflow.errors import UserError
from distilflow.models.layers import LayerPair
from distilflow.train.checkpoint import WEIGHTS

if TYPE_CHECKING:
    from distilflow.config import Config

Batch = dict[str, torch.Tensor]
MANIFEST = "manifest.json"
# Under torchrun each rank lists the shards it wrote in its own part; rank 0 merges them into MANIFEST.
RANK_PART = "manifest.rank-{rank}.json"
VERSION = 1
FORMATS = ("full", "topk", "sampled")
# Keys of a shard file per format (features are added as feature.0, feature.1, ...).
TENSORS = {"full": ("logits",), "topk": ("logprobs", "ids"), "sampled": ("ids", "counts")}
BYTES_PER_ENTRY = {"logits": 4, "logprobs": 2, "ids": 4, "counts": 1}
# Across tokenizers a shard also holds the alignment its signals belong to (the teacher's ids and group
# columns) and, top-k, each next teacher token's log-probability.
ALIGNED_TENSORS = ("teacher_ids", "teacher_group")
BYTES_PER_ENTRY.update({"teacher_ids": 4, "teacher_group": 4, "next_logprobs": 4})


def cache_dir(cfg: Config) -> Path:
    """``cache.path``, or ``<run_dir>/teacher_cache``."""
    return Path(cfg.cache.path).expanduser() if cfg.cache.path else cfg.run_dir / "teacher_cache"


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the names and bytes of ``paths``, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _sha256_tensors(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{flat.dtype}{tuple(flat.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def teacher_files(cfg: Config) -> tuple[str, list[Path]]:
    """Where the configured teacher's weights live: a description and the files that hold them (a served
    teacher's weights are not here: its folder's config.json stands for its architecture)."""
    m, server = cfg.teacher.model, cfg.teacher.server
    if server is not None:
        return f"model '{server.model}' served at {server.url}", [Path(m.folder).expanduser() / "config.json"]
    if m.checkpoint:
        path = Path(m.checkpoint).expanduser()
        return f"checkpoint {path}", [path / WEIGHTS if path.is_dir() else path]
    if m.folder:
        folder = Path(m.folder).expanduser()
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("pytorch_model*.bin"))
        return f"hf folder {folder}", [folder / "config.json", *files]
    return f"{m.arch} trained in {cfg.run_dir / 'teacher'}", [cfg.run_dir / "teacher" / WEIGHTS]


@dataclass
class CacheSource:
    """What the cache reads from a run (``Workload.cache_source``), instead of the whole run.

    ``rows``: the rows the student is distilled on, as the student task indexes them (row i is
    index i; every tensor ``(N, ...)``, on the CPU); ``forward(model, batch)``: the teacher's logits
    as the loss sees them; ``tokenizer``: the tokenizer of teacher and student (None for classifiers).
    Across tokenizers (tasks/cross_tokenizer.py): ``teacher_tokenizer`` the teacher's, and
    ``next_ids`` the column of the teacher's own ids, whose next-token log-probabilities a top-k
    cache also keeps (``next_logprobs``: what merging a multi-token span needs).
    """

    rows: Batch
    forward: Callable[[nn.Module, Batch], torch.Tensor]
    tokenizer: Any = None
    teacher_tokenizer: Any = None
    next_ids: str | None = None

    def probe(self, device: torch.device) -> Batch:
        """The first two rows, without labels, on ``device`` (shapes of logits and features)."""
        return {k: v[:2].to(device) for k, v in self.rows.items() if k not in ("labels", "y")}


def _tokenizer_sha256(tokenizer: Any) -> str | None:
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def identity(cfg: Config, source: CacheSource, *, vocab_size: int, pairs: list[LayerPair]) -> dict[str, Any]:
    """What cached signals depend on; a reader's identity must equal the writer's.

    ``teacher_sha256`` is None while the teacher is not trained yet (then it is not compared).
    """
    c, served = cfg.cache, cfg.teacher.server
    rows = source.rows
    sparse = c.format != "full"
    ident: dict[str, Any] = {
        "version": VERSION,
        "task": cfg.task,
        "format": c.format,
        "k": c.k if c.format == "topk" else None,
        "samples": c.samples if c.format == "sampled" else None,
        "seed": c.seed if c.format == "sampled" else None,
        # Full logits do not depend on the temperature; top-k log-probs and sampled draws do.
        "temperature": cfg.distill.temperature if sparse else None,
        "vocab_size": vocab_size,
        "rows": len(next(iter(rows.values()))),
        "seq_len": cfg.data.token_rows.seq_len if cfg.task == "causal_lm" else None,
        "data_sha256": _sha256_tensors([rows[k] for k in sorted(rows)]),
        "tokenizer_sha256": _tokenizer_sha256(source.tokenizer),
        # Across tokenizers: the teacher's tokenizer (the rows, hashed above, hold both sides and the groups).
        "teacher_tokenizer_sha256": _tokenizer_sha256(source.teacher_tokenizer),
        "cross_tokenizer": True if source.next_ids else None,  # None: a same-tokenizer cache (as before)
        # A served teacher runs in the server's dtype; its served name (checked against the server) instead.
        "teacher_dtype": None if served else cfg.teacher.model.dtype,
        "teacher_served": served.model if served else None,
        "features": bool(c.features),
        # The manifest's form of a pair: [student path, teacher path, weight].
        "feature_pairs": [[p.student, p.teacher, p.weight] for p in pairs] if c.features else [],
        "teacher_sha256": teacher_sha256(cfg),
    }
    return ident


def teacher_sha256(cfg: Config) -> str | None:
    """Hash of the teacher's weight files, or None when they do not exist (yet).

    Computed once per process for the same files (path, size, modification time): a 70B teacher's
    140 GB are read once by a command, not by each check that compares a cache with the config."""
    _, files = teacher_files(cfg)
    if not files or not all(f.is_file() for f in files):
        return None
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _TEACHER_HASHES:
        _TEACHER_HASHES[key] = sha256_files(files)
    return _TEACHER_HASHES[key]


_TEACHER_HASHES: dict[tuple[tuple[str, int, int], ...], str] = {}


def forget_teacher_hashes() -> None:
    """Drop the hashes :func:`teacher_sha256` remembers: the next call reads the files again (for a
    file rewritten in place with the same size and modification time, and for tests that count reads)."""
    _TEACHER_HASHES.clear()


def mismatch(folder: Path, stored: dict[str, Any], expected: dict[str, Any]) -> str | None:
    for key, value in expected.items():
        if value is None and key == "teacher_sha256":
            continue  # the teacher is not trained yet: checked again once it is
        if stored.get(key) != value:
            have, want = stored.get(key), value
            if isinstance(have, str) and len(have) == 64:
                have, want = have[:12], (want or "")[:12]
            return (
                f"teacher cache '{folder}' does not match this config: {key} is {have!r} there, {want!r} here; "
                "run 'distilflow cache-teacher' with a new cache.path (or delete the folder)"
            )
    return None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The cache's manifest (None when there is none), its form checked: JSON, never a pickle; each
    shard a plain file name in the folder (a name with a folder part, ``..`` or an absolute path is
    refused: a manifest never points outside its cache)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not _well_formed(manifest):
        raise UserError(f"teacher cache manifest '{path}' is not a distilflow manifest; delete the folder")
    for shard in manifest["shards"]:
        name = shard["file"]
        if Path(name).name != name or name in ("", ".", ".."):
            raise UserError(
                f"teacher cache manifest '{path}' names shard file {name!r}, outside the cache folder; a manifest "
                "names files in its own folder only: delete the folder and cache again"
            )
    return manifest


def _well_formed(manifest: Any) -> bool:
    """The manifest's keys and types as the writer makes them (a hand-edited one may be anything)."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(manifest, dict):
        return False
    ident, shards = manifest.get("identity"), manifest.get("shards")
    if not isinstance(ident, dict) or not isinstance(shards, list) or not count(ident.get("rows")):
        return False
    for shard in shards:
        if not isinstance(shard, dict) or not isinstance(shard.get("file"), str):
            return False
        rows = shard.get("rows")
        if not (isinstance(rows, list) and len(rows) == 2 and all(map(count, rows))):
            return False
        if not count(shard.get("bytes")) or not isinstance(shard.get("sha256"), str):
            return False
    return True


def shard_path(folder: Path, name: str) -> Path:
    """``folder / name``, refused when it resolves outside ``folder`` (a shard replaced by a symbolic link)."""
    path = folder / name
    if path.is_symlink() and path.resolve().parent != folder.resolve():
        raise UserError(
            f"teacher cache shard '{path}' is a symbolic link to '{path.resolve()}', outside the cache folder; "
            "shards are read from their own folder only: delete the folder and cache again"
        )
    return path


def uses_features(cfg: Config) -> bool:
    return any("feature" in p.terms for p in cfg.distill.phases)


def logit_width(source: CacheSource, model: nn.Module) -> int:
    """The logit columns ``model`` gives on the source's rows (eval mode, no gradient)."""
    was_training = model.training
    with torch.no_grad():
        width = int(source.forward(model.eval(), source.probe(next(model.parameters()).device)).shape[-1])
    model.train(was_training)
    return width


def check_cache(cfg: Config, source: CacheSource, *, vocab_size: int, pairs: list[LayerPair], writes: bool) -> None:
    """Before anything is written, when the cache is used (or ``writes``: cache-teacher) and the teacher
    model is at hand: ``cache.k`` within its ``vocab_size`` logit columns, and an existing cache at
    ``cache.path`` made for this config (as far as it is known yet: the teacher may not be trained),
    its shards intact when it is complete and used. (A config without the teacher model, reading a
    complete cache, is checked as the cache is opened: distilflow/teachers/cached.py.)"""
    c = cfg.cache
    if not (c.use or writes):
        return
    if c.format == "topk" and c.k > vocab_size:
        raise UserError(f"config key 'cache.k': {c.k} is not allowed; the teacher's vocabulary has {vocab_size} ids")
    folder = cache_dir(cfg)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    problem = mismatch(folder, manifest["identity"], identity(cfg, source, vocab_size=vocab_size, pairs=pairs))
    if problem:
        raise UserError(problem)
    if c.use and manifest.get("complete"):
        verify_shards(folder, manifest)


def verify_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed shard exists with its recorded size and sha256, and the shards cover all rows."""
    expected_start = 0
    for shard in manifest["shards"]:
        path = shard_path(folder, shard["file"])
        if not path.is_file():
            raise UserError(f"teacher cache shard '{path}' is missing; run 'distilflow cache-teacher' again")
        if path.stat().st_size != shard["bytes"]:
            raise UserError(
                f"teacher cache shard '{path}' has {path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced); delete it and run 'distilflow cache-teacher' again"
            )
        if sha256_files([path]) != shard["sha256"]:
            raise UserError(
                f"teacher cache shard '{path}' does not match its sha256 in the manifest (corrupted); "
                "delete it and run 'distilflow cache-teacher' again"
            )
        if shard["rows"][0] != expected_start:
            raise UserError(f"teacher cache '{folder}' has no shard for rows from {expected_start}; cache again")
        expected_start = shard["rows"][1]
    if expected_start != manifest["identity"]["rows"]:
        raise UserError(f"teacher cache '{folder}' covers {expected_start} of {manifest['identity']['rows']} rows")


def cache_summary(manifest: dict[str, Any], folder: Path) -> str:
    """One line: format, rows, shards, bytes on disk and per position."""
    ident = manifest["identity"]
    size = sum(s["bytes"] for s in manifest["shards"])
    detail = {"topk": f" k={ident['k']}", "sampled": f" samples={ident['samples']}"}.get(ident["format"], "")
    return (
        f"teacher cache {folder}: {ident['format']}{detail}, {ident['rows']} rows in {len(manifest['shards'])} shards, "
        f"{size:,} bytes ({manifest['bytes_per_position']} bytes per position"
        f"{', features included' if ident['features'] else ''})"
    )


def cache_complete(cfg: Config) -> bool:
    """Whether ``cache.path`` holds a finished cache (its match and integrity are checked when opened)."""
    manifest = read_manifest(cache_dir(cfg))
    return bool(manifest and manifest.get("complete"))


def reads_cache(cfg: Config) -> bool:
    """Whether distill and run take the teacher's outputs from a complete cache, so that no teacher model
    is built or loaded for distillation (``student.model.hf.init_layers`` still copies teacher layers)."""
    return bool(cfg.cache.use and not cfg.student.model.init_from_teacher and cache_complete(cfg))
