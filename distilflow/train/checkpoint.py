"""Checkpoints of the full training state that can be trusted, and safe loading.

A checkpoint is written atomically (distilflow/storage.py: a temporary file, fsynced, renamed over
the old one, the folder fsynced), so a crash at any moment leaves the old or the new checkpoint,
never half of one. It carries a SHA-256 digest of everything it holds (format 2): a truncated file
fails to load, and an altered byte either fails to load or changes a value the digest covers, so
:func:`read_checkpoint` refuses both. Checkpoints of format 1 (the previous release: no digest)
are still read. Loading uses ``torch.load(weights_only=True)``; final weights are written as
safetensors. Which checkpoint a stage resumes from, and how many are kept, is train/resume.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distilflow.errors import UserError
from distilflow.storage import atomic_write, save_torch, write_json, write_text

__all__ = [
    "CHECKPOINT",
    "FORMAT",
    "HEADS",
    "WEIGHTS",
    "DamagedCheckpoint",
    "digest",
    "read_checkpoint",
    "read_model_state",
    "write_checkpoint",
    "write_json",
    "write_text",
    "write_weights",
]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
HEADS = "heads.safetensors"
FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: written before checkpoints carried a digest


class DamagedCheckpoint(UserError):
    """A checkpoint that is truncated, altered or not a distilflow checkpoint at all."""


def _feed(h: Any, value: Any) -> None:
    """Hash ``value`` canonically: its type, and for tensors dtype, shape and raw bytes."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{tensor.dtype}{tuple(value.shape)};".encode())
        h.update(memoryview(tensor.view(torch.uint8).numpy()))  # the raw bytes, no copy
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)};".encode())
        for item in value:
            _feed(h, item)
    else:  # int, float, bool, str, bytes, None: what weights_only loading allows
        h.update(f"{type(value).__name__}:{value!r};".encode())


def digest(state: dict[str, Any]) -> str:
    """SHA-256 over every value of ``state`` (the ``digest`` entry itself excluded)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    full = {"format": FORMAT, **state}
    full["digest"] = digest(full)
    atomic_write(path, lambda tmp: save_torch(full, tmp))


def write_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage; contiguous copies make tied weights saveable.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state in ``path``; :class:`DamagedCheckpoint` when it is truncated, altered or foreign."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise DamagedCheckpoint(
            f"checkpoint '{path}' is not a readable distilflow checkpoint ({type(exc).__name__}: truncated or "
            "not a checkpoint)"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS or "model" not in state:
        raise DamagedCheckpoint(f"checkpoint '{path}' is not a distilflow checkpoint (format {FORMAT} expected)")
    if state["format"] >= 2 and state.get("digest") != digest(state):
        raise DamagedCheckpoint(f"checkpoint '{path}' was altered after it was written (its SHA-256 does not match)")
    return state


def read_model_state(path: str | Path, role: str) -> dict[str, torch.Tensor]:
    """Model weights from ``.safetensors``, a distilflow checkpoint, or a stage folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / WEIGHTS if (path / WEIGHTS).is_file() else path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{role} weights '{path}' do not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{role} weights '{path}' are not a readable safetensors file ({exc})") from None
    return read_checkpoint(path)["model"]
