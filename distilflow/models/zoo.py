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


class _ConvBeforeNorm:
    """A convolution whose output goes straight into a BatchNorm. The norm subtracts every per-channel
    constant, so the conv bias has a zero gradient in exact arithmetic; in float it gets rounding noise
    (~1e-9), which AdamW normalises into full learning-rate steps in a direction that changes with the
    summation order (1 vs N processes, one CPU vs another), and the running means follow the bias. So
    the bias keeps its value and its place in the state_dict and the optimizer, but its gradient is an
    exact zero (``0 * bias``): it moves only by weight decay, the same in every run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.detach() + 0.0 * self.bias  # the bias's value, with a gradient of exactly 0
        return self._conv_forward(x, self.weight, bias)


class Conv1dBeforeNorm(_ConvBeforeNorm, nn.Conv1d):
    pass


class Conv2dBeforeNorm(_ConvBeforeNorm, nn.Conv2d):
    pass


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
        conv = Conv1dBeforeNorm if dims == 1 else Conv2dBeforeNorm
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
