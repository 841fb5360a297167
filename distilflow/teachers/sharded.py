"""A teacher sharded with FSDP2 under torchrun (``dist.shard_teacher``): another teacher's signals
computed inside the forward of the FSDP2 root that holds the sharded teacher, which gathers its
parameters layer by layer (train/dist.py ``World.shard_teacher_signals`` builds it)."""

from __future__ import annotations

import torch
from torch import nn

from distilflow.losses.objective import Outputs
from distilflow.teachers.base import Batch, TeacherSignals


class ShardedTeacher:
    """``signals`` (a live teacher of the sharded model) run through ``root``'s forward, without gradients."""

    def __init__(self, root: nn.Module, signals: TeacherSignals) -> None:
        self.root, self.signals = root, signals
        self.autocast = getattr(signals, "autocast", False)  # a live teacher runs under the stage's autocast

    def __call__(self, batch: Batch, *, features: bool) -> Outputs:
        with torch.no_grad():
            return self.root(lambda: self.signals(batch, features=features))
