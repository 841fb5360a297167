"""Classifiers: how the loop batches, runs and scores them, and how a run builds them."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from distilflow.config import Config, TrainConfig
from distilflow.config_teachers import teacher_names
from distilflow.data.batches import batch_indices
from distilflow.data.cache import CacheSource
from distilflow.data.classification import ClassificationData, load_classification
from distilflow.losses.objective import Targets
from distilflow.models.build import build_model, count_macs, count_params

Batch = dict[str, torch.Tensor]


class ClassifierTask:
    """Samples ``x`` ``(N, ...)`` with labels ``y`` ``(N,)`` (IGNORE_INDEX = unlabeled); ``route``
    ``(N,)`` the teacher of each sample when several are routed by a data column (-1: none)."""

    per_token = False
    primary_metric = "accuracy"
    unit = "samples"

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
        route: torch.Tensor | None = None,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        self.route = route.to(device) if route is not None else None
        self.test_x, self.test_y = test_x.to(device), test_y.to(device)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device = device

    def micro_batches(self, step: int) -> list[Batch]:
        idx = batch_indices(step, num_samples=len(self.x), batch_size=self.batch_size, seed=self.seed)
        idx = idx.to(self.device)
        # "row": the samples' indices, so a teacher-signal cache finds their cached outputs.
        batches = [{"x": self.x[chunk], "y": self.y[chunk], "row": chunk} for chunk in idx.chunk(self.grad_accum)]
        if self.route is not None:
            for batch in batches:
                batch["route"] = self.route[batch["row"]]
        return batches

    def count(self, batch: Batch) -> int:
        return len(batch["x"])

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["x"])  # (B, C)

    def targets(self, batch: Batch) -> Targets:
        y = batch["y"]
        return Targets(labels=y, kd_mask=torch.ones_like(y, dtype=torch.bool), route=batch.get("route"))

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


class ClassifierWorkload:
    """Builds the classifier models and tasks of a run from its config (a :class:`~distilflow.workload.Workload`)."""

    kind = "classifier"
    per_token = False
    primary_metric = "accuracy"
    tokenizer = None
    teacher_tokenizer = None
    cross_tokenizer = "off"
    aligned_kd = None

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        routed = teacher_names(cfg) if cfg.data.teacher_column else None
        # A label-free student may read inputs alone (its teachers are then given, not trained here).
        self.data: ClassificationData = load_classification(
            cfg.data, teachers=routed, labels_needed=not cfg.distill.label_free
        )

    @property
    def labelled(self) -> bool:
        return self.data.labelled

    def with_teacher(self, cfg: Config) -> ClassifierWorkload:
        """This workload (same data and device) building its teacher from ``cfg.teacher``: one named
        teacher's view of the run (distilflow/teacher_views.py)."""
        other = copy.copy(self)
        other.cfg = cfg
        return other

    def new_model(self, role: str, teacher: nn.Module | None = None) -> nn.Module:
        stage = self.cfg.teacher if role == "teacher" else self.cfg.student
        torch.manual_seed(self.cfg.seed)
        model = build_model(stage.model, self.data.input_shape, self.data.num_classes, role)
        return model.to(self.device)

    def release_teacher(self) -> None:
        """Nothing is kept: every ``new_model`` builds (and loads) anew."""

    def shared_vocab(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Classifiers' teacher and student predict the same classes: nothing to cut."""
        return None

    def task(
        self,
        stage: str,
        train: TrainConfig,
        seed: int,
        vocab_size: None = None,
        *,
        loss_impl: str = "plain",
        chunk_rows: int = 0,
    ) -> ClassifierTask:
        """Teacher and baseline learn from the labeled samples; the student also from the transfer set.

        ``loss_impl`` changes nothing here: a classifier's logits are its output under every implementation."""
        x, y = self.data.distill_set() if stage == "student" else (self.data.train_x, self.data.train_y)
        return ClassifierTask(
            x,
            y,
            test_x=self.data.test_x,
            test_y=self.data.test_y,
            batch_size=train.batch_size,
            grad_accum=train.grad_accum,
            seed=seed,
            device=self.device,
            route=self.data.distill_route() if stage == "student" else None,
        )

    def probe(self, role: str = "student") -> Batch:
        return {"x": self.data.train_x[:2].to(self.device)}

    def logit_shape(self, model: nn.Module, vocab_size: None = None) -> tuple[int, int]:
        """One scored position per sample, one logit per class."""
        return 1, self.data.num_classes

    def fused_problem(self, model: nn.Module) -> str:
        return "a classifier's logits are its output (no lm_head to fuse)"

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["x"])

    def layer_paths(self, model: nn.Module) -> list[str]:
        """Classifiers name their feature layers (``distill.feature_layers``); no stack to map."""
        return []

    def cache_source(self) -> CacheSource:
        """The distillation set (labeled samples, then the transfer set) as the student task indexes it."""
        x, y = self.data.distill_set()
        return CacheSource({"x": x, "y": y}, self.forward)

    def facts(self, model: nn.Module) -> dict[str, int]:
        return {"params": count_params(model), "macs": count_macs(model, self.data.test_x[:1].to(self.device))}

    def save(self, stage_dir, model: nn.Module) -> None:
        """Classifiers need nothing beyond model.safetensors."""

    def preview(self, model: nn.Module) -> list[dict[str, str]]:
        return []

    def test_arrays(self) -> dict[str, np.ndarray]:
        """The test split as numpy arrays (deployment benchmarks and parity checks)."""
        return {"x": self.data.test_x.numpy(), "y": self.data.test_y.numpy()}

    def calibration_feeds(self, steps: int, batch: int) -> list[dict[str, np.ndarray]]:
        """``steps`` batches of training inputs for static quantization (the article's observe_steps)."""
        x, _ = self.data.distill_set()
        feeds = []
        for step in range(steps):
            idx = batch_indices(step, num_samples=len(x), batch_size=batch, seed=self.cfg.seed)
            feeds.append({"x": x[idx].numpy()})
        return feeds

    def save_for_inference(self, folder) -> None:
        """Classifiers need nothing beside the ONNX file."""
