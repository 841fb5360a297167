"""Atomic checkpoints of the full training state, and safe loading.

A checkpoint is written to a temporary file in the same folder, flushed, and renamed over the
old one, so a crash at any moment leaves either the old or the new checkpoint, never half of one.
Loading uses ``torch.load(weights_only=True)``; final weights are also written as safetensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distilflow.errors import UserError

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
HEADS = "heads.safetensors"
FORMAT = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; results and weights get the permissions
# of any other file the user writes (0o666 less the umask).
_FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)  # after writing: some writers (safetensors) replace the file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    _atomic(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage; contiguous copies make tied weights saveable.
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or truncated files
        raise UserError(f"checkpoint '{path}' is not a readable distilflow checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise UserError(f"checkpoint '{path}' is not a distilflow checkpoint (format {FORMAT} expected)")
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
