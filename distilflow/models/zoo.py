"""Built-in small networks, built from config: an MLP, a 1-D CNN and a 2-D CNN.

Module names are stable so that feature layers can be named by path in configs
(``layers.1`` is the MLP's first hidden activation, ``features.2`` the CNN's first conv block,
``pool`` the CNN's pooled features).
BatchNorm uses PyTorch's momentum convention (0.1 = weight of the new batch); TensorFlow's
"momentum 0.99" in the article corresponds to PyTorch's 0.01.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """``(B, *input_shape)`` -> flatten -> [Linear, ReLU] * len(hidden) -> Linear -> ``(B, C)``."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.layers(x.flatten(1))))


class CNN(nn.Module):
    """Conv blocks [Conv, BatchNorm, ReLU, (MaxPool 2 between blocks)], global average pool, Linear.

    ``dims`` 1 takes ``(B, L)`` or ``(B, C, L)``; ``dims`` 2 takes ``(B, H, W)`` or ``(B, C, H, W)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        channels: list[int],
        kernel_size: int = 5,
        dropout: float = 0.0,
        dims: int = 1,
    ):
        super().__init__()
        if len(input_shape) not in (dims, dims + 1):
            raise ValueError(f"a {dims}-D CNN needs inputs of {dims} or {dims + 1} dims per sample, got {input_shape}")
        self.dims = dims
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        pool = nn.MaxPool1d if dims == 1 else nn.MaxPool2d
        cin = input_shape[0] if len(input_shape) == dims + 1 else 1
        layers: list[nn.Module] = []
        for i, c in enumerate(channels):
            layers += [conv(cin, c, kernel_size, padding=kernel_size // 2), norm(c), nn.ReLU()]
            if i < len(channels) - 1:
                layers.append(pool(2))
            cin = c
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.dims + 1:  # no channel dim
            x = x.unsqueeze(1)
        return self.classifier(self.dropout(self.pool(self.features(x))))


class GlobalAvgPool(nn.Module):
    """``(B, C, *spatial)`` -> ``(B, C)``; a module so that the pooled features can be tapped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1)
