"""Capture intermediate outputs by module path with forward hooks: no edits to user models."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from distilflow.errors import UserError


def resolve(model: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule at ``path`` (as in ``named_modules``); an unknown path lists the closest real ones."""
    modules = dict(model.named_modules())
    if path in modules and path != "":
        return modules[path]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.3) or names[:5]
    raise UserError(f"{role} has no module '{path}'; closest module paths: {', '.join(close)}")


def _first_tensor(output: object) -> torch.Tensor:
    """A module's output, or the first tensor of a tuple (HF decoder layers return tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise UserError(f"tapped module returned {type(output).__name__}, not a tensor; tap a module that returns one")


class Taps:
    """Forward hooks on named modules; ``captured`` holds the latest outputs in path order."""

    def __init__(self, model: nn.Module, paths: list[str], role: str) -> None:
        self.modules = [resolve(model, p, role) for p in paths]
        self.captured: list[torch.Tensor | None] = [None] * len(paths)

    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor | None]]:
        """Hooks exist only inside the block, so a saved or exported model carries none."""
        self.captured = [None] * len(self.modules)

        def make_hook(i: int):
            def hook(_module: nn.Module, _inputs: object, output: object) -> None:
                self.captured[i] = _first_tensor(output)

            return hook

        handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield self.captured
        finally:
            for h in handles:
                h.remove()

    def features(self) -> list[torch.Tensor]:
        if any(f is None for f in self.captured):
            missing = [i for i, f in enumerate(self.captured) if f is None]
            raise UserError(f"tapped modules {missing} did not run in the forward pass; tap modules that are used")
        return list(self.captured)  # type: ignore[arg-type]


def feature_shapes(
    model: nn.Module, taps: Taps, forward: Callable[[nn.Module, dict], object], batch: dict
) -> list[tuple[int, ...]]:
    """Per-sample shapes of the tapped features of ``forward(model, batch)`` (eval mode, no gradient;
    the model's mode is restored): what projection heads are sized from. Shapes do not depend on weights."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), taps.capture():
        forward(model, batch)
    model.train(was_training)
    return [tuple(feature.shape[1:]) for feature in taps.features()]
