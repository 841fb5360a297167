"""Tasks that make a step bad on purpose: inf inputs (a NaN loss) or inf gradients (a finite loss)."""

from __future__ import annotations

import math

import torch


class InfGrad(torch.autograd.Function):
    """Identity forward; backward returns inf gradients: an fp16 overflow (or a gradient spike) on demand."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class PoisonLoss:
    """The task, except that at ``steps`` the inputs are inf (the loss becomes NaN); ``kill_at``: the
    process "dies" (KeyboardInterrupt) at the start of that step."""

    def __init__(self, task, steps, kill_at: int | None = None) -> None:
        self.task, self.steps, self.kill_at, self.step = task, set(steps), kill_at, -1

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def micro_batches(self, step: int):
        if self.kill_at is not None and step >= self.kill_at:
            raise KeyboardInterrupt
        self.step = step
        batches = self.task.micro_batches(step)
        return [{**b, "x": b["x"] * math.inf} for b in batches] if step in self.steps else batches


class PoisonGrad(PoisonLoss):
    """The task, except that at ``steps`` the student's logits get inf gradients (the loss stays finite)."""

    def micro_batches(self, step: int):
        self.step = step
        return self.task.micro_batches(step)

    def forward(self, model, batch):
        logits = self.task.forward(model, batch)
        return InfGrad.apply(logits) if model.training and self.step in self.steps else logits
