"""A teacher served by vLLM as ``TeacherSignals``: top-k log-probabilities over HTTP, the next requests
sent while the student trains.

:class:`ServedTeacher` answers each micro-batch with ``Outputs(SparseTeacher)`` (kind ``topk`` at
T = 1, ids and log-probabilities ``(B, T - 1, k)``, the tail left to the loss) from a
:class:`~distilflow.teachers.served_client.TeacherClient`, so the top-k loss of a cache applies
unchanged. It gives no features (the config refuses feature phases with a served teacher).

Overlap: :class:`Lookahead` wraps the stage's task. When the loop asks it for step s's micro-batches
it sends the requests of those micro-batches (if not sent yet) and, when batches are a pure function
of the step (not on-policy sampling), those of step s + 1, from the client's worker thread; the
teacher then takes the answer whose rows equal the batch it is given (compared by value, so a batch
that differs from the one sent ahead is asked for again, never answered wrongly). The loop itself
does not change: it calls the task and the teacher as for any other.

Faults: a request that fails after the client's retries raises its one-line UserError at the
micro-batch that needed it; a position of a real token without log-probabilities is refused
(never a silent zero loss). The stage that trains keeps its last checkpoint and resumes when run again.

Shared vocabulary: the server scores the teacher's whole vocabulary. Where the student has fewer
ids (``vocab_size``), ids past it are moved into the tail bucket; a local teacher would instead
renormalise over the shared ids. Both agree when those ids carry no mass (the padding rows of an
embedding table, as in the Qwen family); more than :data:`DROPPED_MASS` on them at a real position
is refused.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from distilflow.errors import UserError
from distilflow.losses.objective import Outputs
from distilflow.losses.sparse import SparseTeacher
from distilflow.teachers.base import Batch
from distilflow.teachers.served_client import TeacherClient
from distilflow.train import dist

if TYPE_CHECKING:
    from torch import nn

    from distilflow.losses.objective import Targets
    from distilflow.train.loop import Task

# Largest teacher probability on ids the student lacks that may move into the tail bucket unnoticed.
DROPPED_MASS = 1e-3


class TeacherUnavailable(UserError):
    """The served teacher gave no usable answer for a micro-batch (after the client's retries): the stage stops."""


def checked_signals(
    signals: SparseTeacher, attention_mask: torch.Tensor, *, vocab_size: int, where: str
) -> SparseTeacher:
    """``signals`` ``(B, T - 1, k)`` for rows with ``attention_mask`` ``(B, T)``, refused when a position whose
    next token is real has no log-probability, with ids ``>= vocab_size`` moved into the tail (values
    ``-inf``, id 0; refused when they carry more than :data:`DROPPED_MASS`). ``where`` names the server."""
    # (B, T - 1): positions whose token and next token are real (nothing predicts a row's first token)
    mask = attention_mask.bool().to(signals.values.device)
    real = mask[:, 1:] & mask[:, :-1]
    missing = int((torch.isneginf(signals.values[..., 0]) & real).sum())
    if missing:
        raise UserError(
            f"{where} gave no log-probabilities at {missing} positions of real tokens; refusing to train on "
            "them (a zero loss would hide it)"
        )
    outside = signals.ids >= vocab_size  # (B, T - 1, k)
    if not bool(outside.any()):
        return signals
    dropped = torch.logsumexp(signals.values.masked_fill(~outside, -math.inf), dim=-1)  # (B, T - 1)
    worst = float(dropped[real].max()) if bool(real.any()) else -math.inf
    if worst > math.log(DROPPED_MASS):
        raise UserError(
            f"{where}: the teacher puts probability {math.exp(worst):.3g} on ids the student lacks (>= {vocab_size}); "
            f"a served teacher can drop at most {DROPPED_MASS:g} into the tail; use a student with the teacher's "
            "vocabulary, or run the teacher in this process (it renormalises over the shared ids)"
        )
    ids, values = signals.ids.masked_fill(outside, 0), signals.values.masked_fill(outside, -math.inf)
    return SparseTeacher(ids, values, signals.kind, signals.temperature)


class ServedTeacher:
    """Teacher signals from a vLLM server (a :class:`~distilflow.teachers.base.TeacherSignals`); see the
    module docstring. ``vocab_size``: the student's shared-vocabulary cut (its logit columns);
    ``device``: where the signals go. Counts: ``requests`` sent, ``ahead_hits`` answered by a request
    sent ahead."""

    autocast = False  # nothing runs here; the answers are moved

    def __init__(self, client: TeacherClient, *, vocab_size: int, device: torch.device) -> None:
        self.client, self.vocab_size, self.device = client, vocab_size, device
        self._pending: deque[tuple[torch.Tensor, torch.Tensor, Future[SparseTeacher]]] = deque()
        self.requests = self.ahead_hits = 0
        self.where = f"teacher server at {client.server.url} ('{client.model}')"

    def ahead(self, batch: Batch) -> None:
        """Send ``batch``'s request now from the client's worker thread; the call with this batch takes it."""
        input_ids, attention_mask = _rows(batch)
        self._pending.append((input_ids, attention_mask, self.client.prefetch(input_ids, attention_mask)))
        self.requests += 1

    def __call__(self, batch: Batch, *, features: bool) -> Outputs:
        if features:
            raise UserError("a served teacher gives no features; drop the 'feature' term from distill.phases")
        input_ids, attention_mask = _rows(batch)
        future = self._take(input_ids, attention_mask)
        try:
            if future is not None:
                self.ahead_hits += 1
                signals = future.result()
            else:
                self.requests += 1
                signals = self.client.topk(input_ids, attention_mask)
            signals = checked_signals(signals, attention_mask, vocab_size=self.vocab_size, where=self.where)
        except UserError as error:
            raise TeacherUnavailable(str(error)) from None
        moved = SparseTeacher(signals.ids.to(self.device), signals.values.to(self.device), "topk", 1.0)
        return Outputs(moved)

    def _take(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Future[SparseTeacher] | None:
        """The request sent ahead for these rows; requests sent before it were for batches not asked for."""
        while self._pending:
            sent_ids, sent_mask, future = self._pending.popleft()
            if torch.equal(sent_ids, input_ids) and torch.equal(sent_mask, attention_mask):
                return future
            future.cancel()  # not started yet: never sent; else its answer is dropped
        return None

    def close(self) -> None:
        """Drop the requests sent ahead and stop the client's worker thread."""
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()
        self.client.close()


def _rows(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU copies of a batch's ``input_ids`` and ``attention_mask`` ``(B, T)`` (what a request is keyed by)."""
    return batch["input_ids"].detach().cpu().clone(), batch["attention_mask"].detach().cpu().clone()


class Lookahead:
    """A :class:`~distilflow.train.loop.Task` that sends the served teacher's requests ahead (see the
    module docstring): this step's micro-batches when the loop asks for them, and with ``next_step`` the
    next step's too (up to ``total_steps``), each as this process's share of it under torchrun.
    ``wanted(step)``: whether the step's phase uses the teacher (no request is sent for one that does not)."""

    def __init__(
        self,
        task: Task,
        teacher: ServedTeacher,
        *,
        next_step: bool,
        total_steps: int,
        wanted: Callable[[int], bool] = lambda step: True,
    ) -> None:
        self.task, self.teacher, self.next_step, self.total_steps = task, teacher, next_step, total_steps
        self.wanted = wanted
        self.per_token, self.primary_metric, self.unit = task.per_token, task.primary_metric, task.unit
        self._ahead: dict[int, list[Batch]] = {}

    def micro_batches(self, step: int) -> list[Batch]:
        batches = self._ahead.pop(step, None)
        self._ahead.clear()
        if batches is None:
            batches = self.task.micro_batches(step)
            if self.wanted(step):
                self._send(batches)
        if self.next_step and step + 1 < self.total_steps and self.wanted(step + 1):
            upcoming = self.task.micro_batches(step + 1)  # a pure function of the step: the same batches later
            self._ahead[step + 1] = upcoming
            self._send(upcoming)
        return batches

    def _send(self, batches: list[Batch]) -> None:
        world = dist.current()  # the loop hands the teacher this rank's rows of each micro-batch
        for batch in batches:
            self.teacher.ahead(world.shard(batch))

    def count(self, batch: Batch) -> int:
        return self.task.count(batch)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.task.forward(model, batch)

    def targets(self, batch: Batch) -> Targets:
        return self.task.targets(batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.task.evaluate(model)


class ServedCacheSignals:
    """A served teacher's signals as ``cache-teacher`` stores them (a
    :class:`~distilflow.data.cache_writer.CacheSignals`): top-k log-probabilities in float16 and ids in
    int32, padding positions empty (``-inf``, id 0). The client asks ``cache.k`` ids per position."""

    device = torch.device("cpu")

    def __init__(self, client: TeacherClient, *, vocab_size: int) -> None:
        self.client, self.vocab_size = client, vocab_size
        self.where = f"teacher server at {client.server.url} ('{client.model}')"

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        signals = self.client.topk(input_ids, attention_mask)
        signals = checked_signals(signals, attention_mask, vocab_size=self.vocab_size, where=self.where)
        return {"logprobs": signals.values.half(), "ids": signals.ids.int()}
