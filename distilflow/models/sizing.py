"""Candidate student shapes for hardware-aware sizing, and their cost (``distilflow size-student``).

How candidates are generated (no training: each is built at random init, which does not change its
latency):

- **MLP** (``model.mlp``): hidden widths from :data:`WIDTHS` (a geometric grid, about x1.4 a step,
  16 to 2,048), at the configured student's depth and at one layer less (when it has more than one),
  every hidden layer of one candidate equally wide (the demo's shape). Widths given by the caller
  replace the grid.
- **CNN** (``model.cnn``): the configured channels scaled by :data:`CHANNEL_SCALES` (rounded to a
  multiple of 4, at least 4), at the configured depth and one block less; the kernel size kept.

Each candidate carries its parameters and MACs per sample (the FLOP counter, as the results table),
so candidates can be ordered by size without timing them. Causal-LM candidates: models/sizing_lm.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.models.build import count_macs, count_params
from distilflow.models.zoo import CNN, MLP

WIDTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
"""MLP hidden widths tried: a x1.33-x1.5 grid, fine enough that the chosen width is within ~1.4x of
the largest that fits (its latency within ~2x: an MLP's MACs grow with width squared)."""
CHANNEL_SCALES = (0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
"""Factors on the configured CNN channels (the same ~x1.4 spacing)."""
SUPPORTED_ARCHS = ("mlp", "cnn1d", "cnn2d")


@dataclass
class Candidate:
    """One student shape: ``model`` is its ``student.model`` section (arch + the kind's section)."""

    name: str
    model: dict[str, Any]
    params: int = 0
    macs: int = 0
    module: nn.Module | None = field(default=None, repr=False)
    path: Path | None = None  # the exported file a memory measurement loads


def mlp_shapes(hidden: list[int], widths: tuple[int, ...] | list[int] = WIDTHS) -> list[list[int]]:
    """Hidden-layer lists: every width at the configured depth and at one layer less."""
    depth = max(len(hidden), 1)
    depths = [depth - 1, depth] if depth > 1 else [depth]
    return [[w] * d for d in depths for w in widths]


def cnn_shapes(channels: list[int], scales: tuple[float, ...] | list[float] = CHANNEL_SCALES) -> list[list[int]]:
    """Channel lists: the configured ones scaled (multiples of 4), at the configured depth and one block less."""
    depths = [len(channels) - 1, len(channels)] if len(channels) > 1 else [len(channels)]
    shapes = []
    for d in depths:
        for s in scales:
            shape = [max(4, int(round(c * s / 4)) * 4) for c in channels[:d]]
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def candidates(
    model: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    widths: list[int] | None = None,
) -> list[Candidate]:
    """The candidates around the configured ``student.model`` section ``model`` (a dict as in
    config.yaml), each built once (seeded) and costed, ordered by MACs then parameters."""
    arch = model["arch"]
    found = []
    if arch == "mlp":
        section = dict(model.get("mlp") or {})
        for hidden in mlp_shapes(list(section.get("hidden", [192, 192])), tuple(widths or WIDTHS)):
            torch.manual_seed(0)
            module = MLP(input_shape, num_classes, hidden, dropout=0.0)
            spec = {"arch": "mlp", "mlp": {**section, "hidden": hidden}}
            found.append(Candidate(f"mlp {hidden}", spec, module=module))
    elif arch in ("cnn1d", "cnn2d"):
        section = dict(model.get("cnn") or {})
        base = list(section.get("channels", [32, 32, 32]))
        kernel = int(section.get("kernel_size", 5))
        scales = [w / max(base) for w in widths] if widths else CHANNEL_SCALES
        for channels in cnn_shapes(base, scales):
            torch.manual_seed(0)
            module = CNN(input_shape, num_classes, channels, kernel_size=kernel, dims=1 if arch == "cnn1d" else 2)
            spec = {"arch": arch, "cnn": {**section, "channels": channels}}
            found.append(Candidate(f"{arch} {channels}", spec, module=module))
    else:
        raise ValueError(arch)
    example = torch.zeros(1, *input_shape)
    for c in found:
        c.module.eval()
        c.params, c.macs = count_params(c.module), count_macs(c.module, example)
    return sorted(found, key=lambda c: (c.macs, c.params))
