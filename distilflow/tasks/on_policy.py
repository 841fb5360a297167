"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models").

A batch source wrapped around a :class:`~distilflow.tasks.causal_lm.CausalLMTask`: on a step drawn
with probability ``lmbda`` the continuations of the step's rows are replaced by samples from the
*current student* (the prompts stay), and the teacher scores them through the usual KD term
(``distill.divergence``: ``jsd`` with ``jsd_beta`` is the paper's generalised JSD, ``reverse_kl``
its beta -> 1 limit). Other steps use the fixed data (sequence-level KD on teacher traces). The
training loop is unchanged: it only sees other batches.

Which steps are on-policy is a pure function of ``(seed, step)``, so a resumed run draws the same.
Sampling may start after ``start_step`` steps on the fixed data: a student that still writes noise
learns little from the teacher's scores of it (the GKD paper starts from a fine-tuned student).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from distilflow.errors import UserError
from distilflow.generate.backends import sample_ids
from distilflow.generate.sampling import Sampling
from distilflow.losses.objective import IGNORE_INDEX, Targets
from distilflow.tasks.causal_lm import CausalLMTask

Batch = dict[str, torch.Tensor]


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Tokens before the first scored label of each row ``(N,)``; labels ``(N, T)`` align with inputs."""
    scored = (labels != IGNORE_INDEX) & attention_mask.bool()  # (N, T)
    first = scored.int().argmax(dim=1)
    return torch.where(scored.any(dim=1), first, attention_mask.sum(dim=1))


class OnPolicyTask:
    """A :class:`CausalLMTask` whose continuations are, with probability ``lmbda`` per step, the student's.

    ``student`` is the model being trained (sampled in eval mode without gradients, then put back).
    Rows must start with an unscored prompt (prompt/completion or chat records, ``data.text.pack: false``).
    """

    def __init__(
        self,
        base: CausalLMTask,
        student: nn.Module,
        *,
        lmbda: float,
        sampling: Sampling,
        pad_token_id: int,
        eos_token_id: int | None,
        seed: int,
        start_step: int = 0,
    ) -> None:
        if not 0.0 <= lmbda <= 1.0:
            raise UserError(f"on_policy.lmbda {lmbda} is not allowed; use a probability in [0, 1]")
        lengths = prompt_lengths(base.train["labels"], base.train["attention_mask"])
        if bool((lengths == 0).any()):
            raise UserError(
                "on-policy distillation samples continuations of prompts, but some training rows have no prompt; "
                "use prompt/completion or chat records with data.text.pack: false"
            )
        self.base, self.student, self.lmbda, self.sampling = base, student, lmbda, sampling
        self.pad_token_id, self.eos_token_id, self.seed = pad_token_id, eos_token_id, seed
        self.start_step = start_step
        self.per_token, self.primary_metric, self.unit = base.per_token, base.primary_metric, base.unit
        self.on_policy_steps = 0

    def is_on_policy(self, step: int) -> bool:
        """Drawn with probability ``lmbda`` from ``start_step`` on (before: the fixed data only)."""
        return step >= self.start_step and random.Random(self.seed * 1_000_003 + step).random() < self.lmbda

    def micro_batches(self, step: int) -> list[Batch]:
        batches = self.base.micro_batches(step)
        if not self.is_on_policy(step):
            return batches
        self.on_policy_steps += 1
        return [self.student_continuations(batch) for batch in batches]

    def student_continuations(self, batch: Batch) -> Batch:
        """The batch's prompts, each continued by a sample from the student; only the sample is scored
        (the base task's :meth:`~distilflow.tasks.causal_lm.CausalLMTask.continued_rows`)."""
        width = batch["input_ids"].shape[1]
        lengths = prompt_lengths(batch["labels"], batch["attention_mask"]).tolist()
        prompts = [row[:n].tolist() for row, n in zip(batch["input_ids"], lengths)]
        room = width - max(lengths)
        sampling = Sampling(
            max_new_tokens=max(1, min(self.sampling.max_new_tokens, room)),
            temperature=self.sampling.temperature,
            top_p=self.sampling.top_p,
        )
        samples = sample_ids(
            self.student, prompts, sampling=sampling, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id
        )
        # The base task makes the rows: the student's own tokens, or (across tokenizers) re-aligned text.
        return self.base.continued_rows(batch, prompts, samples, pad=self.pad_token_id, eos=self.eos_token_id)

    def count(self, batch: Batch) -> int:
        return self.base.count(batch)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.base.forward(model, batch)

    def targets(self, batch: Batch) -> Targets:
        targets = self.base.targets(batch)
        if "sampled" in batch:  # on-policy rows: KD on the sampled tokens, no cross-entropy
            targets.labels = torch.full_like(targets.labels, IGNORE_INDEX)
        return targets

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return self.base.evaluate(model)


def on_policy_task(
    task: CausalLMTask, student: nn.Module, settings, tokenizer, *, seed: int, total_steps: int
) -> OnPolicyTask:
    """The ``on_policy:`` config section applied to ``task``; the tokenizer gives pad and eos ids."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return OnPolicyTask(
        task,
        student,
        lmbda=settings.lmbda,
        sampling=Sampling(settings.max_new_tokens, settings.temperature, settings.top_p),
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        start_step=round(settings.start_fraction * total_steps),
    )
