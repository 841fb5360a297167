"""The ``Workload`` seam: what the pipeline needs from a kind of model and data.

A workload is built once per run from the config (:func:`make_workload`) and owns the data, the
tokenizer (causal LMs) and how models of its kind are built, run, scored, saved and shipped. The
stages (distilflow/stages.py, distilflow/pipeline.py, distilflow/reasoning.py), the teacher-signal
cache (through :meth:`Workload.cache_source`) and the deploy stage (deploy/stage.py) use a workload
through these methods only. Implementations:

- :class:`distilflow.tasks.classify.ClassifierWorkload`: MNIST-1D, ``.npz`` / ``.csv`` files or a
  ``module:factory``; built-in MLP / CNN or your ``module:factory`` models;
- :class:`distilflow.tasks.causal_lm_workload.CausalLMWorkload`: Hugging Face causal LMs on text files or the
  built-in stdlib corpus;
- :class:`distilflow.tasks.cross_tokenizer.CrossTokenizerWorkload`: the same when teacher and student
  tokenizers differ (rows aligned across tokenizers, the teacher run on its own tokens);
- :class:`distilflow.tasks.reasoning.ReasoningWorkload`: the reasoning demo's arithmetic problems
  (a causal-LM workload whose rows differ per stage).

A new kind of model and data is a new implementation (its own module under tasks/), not a branch
in the pipeline. What the training loop needs per stage is the :class:`~distilflow.train.loop.Task`
that :meth:`Workload.task` returns; where teacher outputs come from is a
:class:`~distilflow.teachers.TeacherSignals`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from distilflow.config import Config, TrainConfig
    from distilflow.data.cache import CacheSource
    from distilflow.losses.aligned_kd import AlignedKD
    from distilflow.train.loop import Task

Batch = dict[str, torch.Tensor]


@runtime_checkable
class Workload(Protocol):
    """A kind of model and data, as the stages, the cache and the deploy stage use it."""

    kind: str
    """``"classifier"`` or ``"causal_lm"``: how deploy exports, benchmarks and scores the student."""
    per_token: bool
    """Whether the loss terms average over tokens (causal LMs) rather than samples."""
    primary_metric: str
    """The metric of :meth:`Task.evaluate` that results and reports lead with (accuracy, perplexity, ...)."""
    device: torch.device
    tokenizer: Any
    """Causal LMs: the student's tokenizer (on-policy sampling decodes with it); else None."""
    teacher_tokenizer: Any
    """Causal LMs: the teacher's tokenizer (the same object when both share one); else None."""
    cross_tokenizer: str
    """``"off"`` when the teacher reads the student's tokens; ``"uld"`` or ``"hybrid"`` when its tokenizer
    differs (``distill.cross_tokenizer``): batches then carry the alignment (data/aligned_rows.py)."""
    aligned_kd: AlignedKD | None
    """The KD term across tokenizers (losses/aligned_kd.py) when ``cross_tokenizer`` is not off, else None."""
    labelled: bool
    """Whether the training rows carry labels (a label-free classifier run may read inputs alone)."""

    # --- models ---------------------------------------------------------------------------------

    def new_model(self, role: str, teacher: nn.Module | None = None) -> nn.Module:
        """A fresh model of ``role`` ("teacher" or "student") as configured, on :attr:`device`, with
        the run's seed set first (so the baseline and the distilled student start equal). ``teacher``:
        a student copies layers from it when the config asks (``init_layers``)."""
        ...

    def release_teacher(self) -> None:
        """Forget the teacher this workload keeps loaded (a model folder is read once and kept), so that its
        memory is freed once the caller drops it too; the next ``new_model("teacher")`` loads it again."""
        ...

    def with_teacher(self, cfg: Config) -> Workload:
        """This workload (same data, tokenizer and device) building its ``"teacher"`` from ``cfg.teacher``:
        one named teacher's view of a run with several (distilflow/teacher_views.py)."""
        ...

    def shared_vocab(self, student: nn.Module, teacher: nn.Module | None) -> int | None:
        """Logit columns the student is trained and scored on when they must be cut (teacher and student
        embedding tables of different sizes over one tokenizer), else None."""
        ...

    def layer_paths(self, model: nn.Module) -> list[str]:
        """Module paths of the model's stacked layers, in order (what ``distill.layer_map`` pairs); [] when
        the kind has none (classifiers name their feature layers in ``distill.feature_layers``)."""
        ...

    # --- what the loop trains on ----------------------------------------------------------------

    def task(
        self,
        stage: str,
        train: TrainConfig,
        seed: int,
        vocab_size: int | None = None,
        *,
        loss_impl: str = "plain",
        chunk_rows: int = 0,
    ) -> Task:
        """The batches, forward pass, targets and evaluation of ``stage`` (teacher, baseline, student,
        or a reasoning method), batched by ``train`` in the order of ``seed``. ``vocab_size``: the
        shared-vocabulary cut; ``loss_impl`` / ``chunk_rows``: the stage's resolved
        ``distill.loss_impl`` (the objective gets the same; fused: the forward gives hidden states)."""
        ...

    def logit_shape(self, model: nn.Module, vocab_size: int | None = None) -> tuple[int, int]:
        """Scored positions per training row and logit columns per position (what ``loss_impl: auto``
        decides by): ``(1, classes)`` for classifiers, ``(seq_len - 1, vocabulary)`` for causal LMs."""
        ...

    def fused_problem(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot use the fused loss (logits made from hidden states and lm_head), or None."""
        ...

    def probe(self, role: str = "student") -> Batch:
        """Two training rows without labels, as ``role``'s model reads them: shapes of features and logits
        are read from a forward on them."""
        ...

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of ``model`` on ``batch`` as the loss sees them (causal LMs: shifted, ``(B, T - 1, V)``)."""
        ...

    def cache_source(self) -> CacheSource:
        """What the teacher-signal cache reads: the rows the student is distilled on (row i is index i of
        the student task's rows), the teacher's forward pass, the tokenizer."""
        ...

    # --- results --------------------------------------------------------------------------------

    def facts(self, model: nn.Module) -> dict[str, int]:
        """Cost of a model for the results table: ``params`` and ``macs`` (per sample) or ``macs_per_token``."""
        ...

    def preview(self, model: nn.Module) -> list[dict[str, str]]:
        """A few outputs to show in results.json (causal LMs: greedy continuations), or []."""
        ...

    def save(self, stage_dir: Path, model: nn.Module) -> None:
        """Whatever a finished stage needs beside ``model.safetensors`` (causal LMs: a Hugging Face folder)."""
        ...

    # --- deploy ---------------------------------------------------------------------------------

    def test_arrays(self) -> dict[str, np.ndarray]:
        """The held-out split as numpy arrays, named as the exported model's inputs (and labels)."""
        ...

    def calibration_feeds(self, steps: int, batch: int) -> list[dict[str, np.ndarray]]:
        """``steps`` batches of ``batch`` training inputs for static quantization."""
        ...

    def save_for_inference(self, folder: Path) -> None:
        """What ``distilflow predict`` needs beside the exported model (causal LMs: the tokenizer)."""
        ...


def make_workload(cfg: Config, device: torch.device) -> Workload:
    """The workload of the config: the reasoning demo's, causal LMs for text sources (across tokenizers when
    the two differ), else classifiers."""
    if cfg.reasoning.task != "off":
        from distilflow.tasks.reasoning import ReasoningWorkload

        return ReasoningWorkload(cfg, device)
    if cfg.task == "causal_lm":
        from distilflow.tasks.cross_tokenizer import causal_lm_workload

        return causal_lm_workload(cfg, device)
    from distilflow.tasks.classify import ClassifierWorkload

    return ClassifierWorkload(cfg, device)
