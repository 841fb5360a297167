"""Build models from config (built-in zoo or ``module.path:factory``), load weights, count cost."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distilflow.config import ModelConfig
from distilflow.errors import UserError
from distilflow.models.zoo import CNN, MLP


def import_object(spec: str, what: str):
    """``'package.module:attr'`` -> the attribute; errors name the spec and the rule."""
    if ":" not in spec:
        raise UserError(f"{what} '{spec}' is not allowed; use a built-in name or 'module.path:factory'")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{what} '{spec}': cannot import module '{module_name}' ({exc})") from None
    except Exception as exc:  # the user's module itself fails while it is imported
        raise UserError(f"{what} '{spec}': importing '{module_name}' raised {_one_line(exc)}") from None
    if not hasattr(module, attr):
        raise UserError(f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def call_user(factory: Callable, spec: str, what: str, **kwargs):
    """Call a user's ``module:factory``; whatever it raises becomes one line naming it and the error."""
    try:
        return factory(**kwargs)
    except Exception as exc:
        given = f" with {sorted(kwargs)}" if kwargs else ""
        raise UserError(f"{what} '{spec}' failed when called{given}: {_one_line(exc)}") from None


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, role: str) -> nn.Module:
    """A fresh model for inputs of ``input_shape`` (per sample) and ``num_classes`` outputs."""
    if cfg.arch == "mlp":
        return MLP(input_shape, num_classes, cfg.mlp.hidden, cfg.mlp.dropout)
    if cfg.arch in ("cnn1d", "cnn2d"):
        dims = 1 if cfg.arch == "cnn1d" else 2
        try:
            return CNN(input_shape, num_classes, cfg.cnn.channels, cfg.cnn.kernel_size, cfg.cnn.dropout, dims=dims)
        except ValueError as exc:
            raise UserError(f"{role}.model.arch '{cfg.arch}': {exc}") from None
    factory = import_object(cfg.arch, f"{role}.model.arch")
    kwargs = dict(cfg.factory.kwargs)
    params = inspect.signature(factory).parameters
    if "input_shape" in params:
        kwargs.setdefault("input_shape", input_shape)
    if "num_classes" in params:
        kwargs.setdefault("num_classes", num_classes)
    model = call_user(factory, cfg.arch, f"{role}.model.arch", **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"{role}.model.arch '{cfg.arch}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path, role: str) -> None:
    """Load a ``.safetensors`` file or a distilflow checkpoint into ``model``; mismatches are UserErrors."""
    from distilflow.train.checkpoint import read_model_state

    state = read_model_state(path, role)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise UserError(f"{role} weights '{path}' do not fit the configured {role} model: {detail}") from None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model: nn.Module, forward: Callable[[nn.Module], object]) -> int:
    """Multiply-accumulates of ``forward(model)`` in eval mode (FLOP counter / 2)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model)
    model.train(was_training)
    return counter.get_total_flops() // 2


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates per sample of one forward pass (a batch of one)."""
    return forward_macs(model, lambda m: m(example[:1]))
