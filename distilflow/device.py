"""The ``device`` config key as a torch device (checked: one line naming what is allowed)."""

from __future__ import annotations

import torch

from distilflow.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"config key 'device': {name!r} is not allowed; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"config key 'device': {name!r} is not available on this machine; use cpu or auto")
    return device
