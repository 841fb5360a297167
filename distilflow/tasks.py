"""The classifier task: how the loop batches, runs and scores a classification model."""

from __future__ import annotations

import torch
from torch import nn

from distilflow.data.batches import batch_indices
from distilflow.losses.objective import IGNORE_INDEX, Targets

Batch = dict[str, torch.Tensor]


class ClassifierTask:
    """Samples ``x`` ``(N, ...)`` with labels ``y`` ``(N,)`` (IGNORE_INDEX = unlabeled)."""

    per_token = False
    primary_metric = "accuracy"

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.test_x, self.test_y = test_x.to(device), test_y.to(device)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device = device

    def micro_batches(self, step: int) -> list[Batch]:
        idx = batch_indices(step, num_samples=len(self.x), batch_size=self.batch_size, seed=self.seed)
        idx = idx.to(self.device)
        return [{"x": self.x[chunk], "y": self.y[chunk]} for chunk in idx.chunk(self.grad_accum)]

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["x"])  # (B, C)

    def targets(self, batch: Batch) -> Targets:
        y = batch["y"]
        return Targets(labels=y, kd_mask=torch.ones_like(y, dtype=torch.bool))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1024) -> dict[str, float]:
        """Accuracy (fraction in [0, 1]) and mean cross-entropy on the test split."""
        was_training = model.training
        model.eval()
        correct, loss = 0, 0.0
        for start in range(0, len(self.test_x), batch_size):
            logits = model(self.test_x[start : start + batch_size]).float()
            labels = self.test_y[start : start + batch_size]
            correct += int((logits.argmax(-1) == labels).sum())
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        model.train(was_training)
        n = len(self.test_x)
        return {"accuracy": correct / n, "loss": loss / n}


def labeled_only(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = y != IGNORE_INDEX
    return x[keep], y[keep]
