"""BatchNorm statistics over the whole micro-batch under torchrun, on any backend (gloo on CPU too).

Under torchrun each rank holds a slice of every micro-batch. A plain BatchNorm in training mode
normalises over its own slice, so N processes train another model than one process does (the
built-in CNN teacher drifted ~8 % in its logged losses). ``torch.nn.SyncBatchNorm`` fixes that on
GPUs only: in torch 2.13 its forward raises ``ValueError`` for CPU tensors ("expected input tensor
to be on GPU or XPU ..."), and the kernels it calls (``batch_norm_stats``) have no CPU version.

:func:`sync_batchnorm` makes every BatchNorm of a module compute its batch statistics over all ranks
instead, with two differentiable all-reduces (``torch.distributed.nn.functional.all_reduce``, whose
backward all-reduces the gradients), so that normalisation, gradients and running statistics equal a
single process's on the whole micro-batch, up to float summation order:

- mean = sum over ranks of the per-channel sums / the total count;
- var  = sum over ranks of sum((x - mean)^2) / the total count (two passes: no E[x^2] - mean^2
  cancellation); the running variance takes the unbiased var * count / (count - 1), as torch does.

Only the module's class changes (to a subclass of its own): parameters, buffers and state_dict keys
stay those of the BatchNorm, so checkpoints and weights are those of a 1-process run. Outside
training, or in a single process, the forward is the BatchNorm's own.
"""

from __future__ import annotations

import torch
from torch import nn

# The BatchNorm classes converted (torch.nn.SyncBatchNorm, GPU-only, is not one of them).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _RankSynced:
    """Mixin put before a BatchNorm class: training-mode statistics over every rank's rows."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the name BatchNorm uses
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().forward(input)
        if torch.distributed.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        return _synced_batch_norm(self, input)


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over all ranks; its backward sums every rank's gradient (each rank's loss
    depends on the sum, so the gradient of one rank's tensor is the sum of all ranks' gradients).

    Plain blocking ``torch.distributed.all_reduce`` both ways: torch 2.13's
    ``torch.distributed.nn.functional.all_reduce`` is deprecated for the functional collectives, and
    with it a gloo rank sometimes aborted at exit ("terminate called without an active exception")."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``tensor`` over all ranks."""
    return _SumOverRanks.apply(tensor)


def _synced_batch_norm(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``x`` (batch, channels, *spatial) with statistics over all ranks' rows."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]  # every dimension but the channels
    shape = [1, channels] + [1] * (x.dim() - 2)  # (1, C, 1, ...): broadcast over the rows
    # Every rank holds the same number of rows (World.check_batch), so the count needs no collective.
    count = x.numel() // channels * torch.distributed.get_world_size()
    mean = all_reduce(x.sum(dims)) / count  # (C,); the backward sums every rank's gradient of the sums
    centered = x - mean.view(shape)
    var = all_reduce((centered * centered).sum(dims)) / count  # (C,), biased: the one that normalises
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            unbiased = var * count / max(count - 1, 1)
            bn.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            bn.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
    return y


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"RankSynced{cls.__name__}", (_RankSynced, cls), {})
    return _SYNCED[cls]


def sync_batchnorm(module: nn.Module) -> int:
    """Make every BatchNorm of ``module`` normalise over all ranks (in place); returns how many."""
    count = 0
    for child in module.modules():
        if isinstance(child, BATCHNORMS) and not isinstance(child, _RankSynced):
            child.__class__ = _synced_class(type(child))
            count += 1
    return count


def unsync_batchnorm(module: nn.Module) -> None:
    """Back to the plain BatchNorm classes (after training: export and evaluation see torch's own)."""
    for child in module.modules():
        if isinstance(child, _RankSynced):
            child.__class__ = next(c for c in type(child).__mro__[1:] if c is not _RankSynced)
