"""What the loop trains under a world: the student and heads wrapped for DDP / FSDP2, and their full state.

:meth:`distilflow.train.dist.World.wrap` builds a :class:`Replica`. Checkpoints hold the full (gathered)
state, in the same format as a 1-process run: with DDP every rank holds it already and rank 0 writes it;
with FSDP2 it is gathered with ``torch.distributed.checkpoint.state_dict.get_state_dict(full_state_dict=True)``
and written by rank 0, and loaded back with ``set_state_dict``. Any world size (and strategy) resumes it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distilflow.models.layers import decoder_layer_modules

if TYPE_CHECKING:
    from distilflow.train.dist import World


class TrainedModules(nn.Module):
    """Student and heads as one module, run through a closure: DDP and FSDP2 see the whole
    micro-batch (student forward, teacher signals, objective) as one forward, so they learn which
    parameters the loss used, and the heads (applied in the objective) are synchronised too."""

    def __init__(self, model: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class Replica:
    """What the loop trains: call it with a closure, take its parameters for the optimizer."""

    def __init__(self, wrapped: nn.Module, step: TrainedModules, world: World, plain: tuple | None = None) -> None:
        self.wrapped, self.step, self.world, self.plain = wrapped, step, world, plain

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.wrapped(fn, *args)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.step.parameters() if p.requires_grad]

    def sync(self, last: bool):
        """Gradient accumulation: DDP synchronises only on the last micro-batch of a step."""
        if not last and hasattr(self.wrapped, "no_sync"):
            return self.wrapped.no_sync()
        if self.world.strategy == "fsdp2" and self.world.distributed:
            self.step.set_requires_gradient_sync(last)
        return nullcontext()

    def gathered(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` outside training (evaluation) with the full parameters: under FSDP2 inside the
        root's forward (which gathers them), else directly (DDP's module shares the parameters)."""
        if not self.sharded:
            return fn(*args)
        with torch.no_grad():
            return self.wrapped(fn, *args)

    def finish(self) -> dict[str, nn.Module]:
        """Under FSDP2: the unsharded model and heads holding the trained weights (``FitResult.model``)."""
        if not self.sharded or self.plain is None:
            return {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        full = self.world.collective("gathering the weights", lambda: get_model_state_dict(self.step, options=options))
        parts = _split({k: v.detach().cpu() for k, v in full.items()})
        model, heads, device = self.plain
        model.load_state_dict(parts["model"])
        heads.load_state_dict(parts["heads"])
        return {"model": model.to(device), "heads": heads.to(device)}

    @property
    def sharded(self) -> bool:
        return self.world.distributed and self.world.strategy == "fsdp2"

    def state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Full model, heads and optimizer state (gathered under FSDP2; a collective there)."""
        if not self.sharded:
            return {
                "model": self.step.model.state_dict(),
                "heads": self.step.heads.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = self.world.collective(
            "gathering the checkpoint", lambda: get_state_dict(self.step, optimizer, options=options)
        )
        if not self.world.is_main:  # cpu_offload: the full state lands on rank 0 only
            return {}
        return {**_split(model_sd), "optimizer": _optim_by_index(optim_sd, self._names())}

    def load_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        """The inverse of :meth:`state` (every rank reads the same file)."""
        if not self.sharded:
            self.step.model.load_state_dict(state["model"])
            self.step.heads.load_state_dict(state["heads"])
            optimizer.load_state_dict(state["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_sd = {**{f"model.{k}": v for k, v in state["model"].items()}}
        model_sd.update({f"heads.{k}": v for k, v in state["heads"].items()})
        optim_sd = _optim_by_name(state["optimizer"], self._names())
        options = StateDictOptions(full_state_dict=True)
        self.world.collective(
            "loading the checkpoint",
            lambda: set_state_dict(
                self.step, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
            ),
        )

    def _names(self) -> list[str]:
        return [n for n, p in self.step.named_parameters() if p.requires_grad]


def leaves_parameters_unused(objective: Any) -> bool:
    """Whether a phase leaves trained parameters without a gradient: one without kd or ce (the output
    layer), or one without the feature term while there are projection heads."""
    heads = len(list(objective.heads.parameters())) > 0
    for phase in objective.plan:
        terms = set(phase.terms)
        if not terms & {"kd", "ce"} or (heads and "feature" not in terms):
            return True
    return False


def _split(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, "heads": {}}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        out[part][rest] = value
    return out


def _optim_by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP) -> keyed by index, as ``optimizer.state_dict()``."""
    index = {name: i for i, name in enumerate(names)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _optim_by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}


def fully_shard_modules(root: nn.Module, model: nn.Module) -> None:
    """FSDP2: each decoder layer of ``model`` (Hugging Face models) is its own unit, then the whole ``root``."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layer_modules(model):
        fully_shard(layer)
    fully_shard(root)
