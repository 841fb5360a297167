"""The causal-LM task: token-level batches, shifted logits (or hidden states for the fused loss), perplexity.

Logits at position t predict the token at t + 1, so a batch's logits are ``(B, T - 1, V)`` and its
labels ``labels[:, 1:]``. Only real, non-prompt tokens count (label != -100). Where teacher and
student embedding tables differ in size (151936 vs 152064 in the Qwen family) both logits are cut to
the shared ids (``vocab_size``). The workload that builds these tasks is
distilflow/tasks/causal_lm_workload.py.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from distilflow.data.batches import batch_indices
from distilflow.errors import UserError
from distilflow.losses.fused import HiddenStates, fused_kd_ce
from distilflow.losses.objective import IGNORE_INDEX, Targets
from distilflow.models.hf import truncate_vocab

Batch = dict[str, torch.Tensor]


def lm_logits(model: nn.Module, batch: Batch, vocab_size: int | None = None) -> torch.Tensor:
    """Shifted logits ``(B, T - 1, V)``: position t predicts token t + 1; cut to ``vocab_size`` ids."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1]
    return truncate_vocab(logits, vocab_size) if vocab_size else logits


_FUSABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_problem(model: nn.Module, batch: Batch) -> str | None:
    """Why ``model`` cannot use the fused loss, or None when it can: its logits must be
    ``lm_head(base_model(...).last_hidden_state)`` with a linear lm_head; a model that caps, scales
    or post-processes its logits (e.g. Gemma 2's soft-capping) cannot. Checked once per model on the
    first row of ``batch``."""
    if model in _FUSABLE:
        return _FUSABLE[model]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(head, nn.Linear) or base is model:
        problem = f"{type(model).__name__} has no linear lm_head and base model"
    else:
        row = {k: batch[k][:1, :8] for k in ("input_ids", "attention_mask")}
        was_training = model.training
        model.eval()  # no dropout, so that the two passes see the same network
        with torch.no_grad():
            expected = model(**row, use_cache=False).logits.float()
            got = head(base(**row, use_cache=False).last_hidden_state).float()
        model.train(was_training)
        scale = float(expected.abs().max()) + 1e-6
        problem = None
        if got.shape != expected.shape or float((got - expected).abs().max()) > 1e-3 * scale:
            problem = (
                f"{type(model).__name__} does not compute its logits as lm_head(final hidden state) "
                "(logit scaling or soft-capping?)"
            )
    _FUSABLE[model] = problem
    return problem


def lm_hidden_states(model: nn.Module, batch: Batch, vocab_size: int | None = None) -> HiddenStates:
    """Final hidden states ``(B, T - 1, H)`` (position t predicts token t + 1) and the lm_head, for the
    fused loss (losses/fused.py): the ``(B, T - 1, V)`` logits are never made here."""
    problem = fused_problem(model, batch)
    if problem:
        raise UserError(f"distill.loss_impl fused: {problem}; use distill.loss_impl=chunked or plain")
    head, base = model.get_output_embeddings(), model.base_model
    # Through base_model, so that forward hooks on decoder layers (feature taps) still fire.
    hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    states = HiddenStates(hidden.last_hidden_state[:, :-1], head.weight, head.bias, vocab_size)
    if vocab_size and vocab_size > head.weight.shape[0]:
        raise UserError(f"cannot keep {vocab_size} logits of a vocabulary of {head.weight.shape[0]}")
    return states


def lm_logit_shape(model: nn.Module, seq_len: int, vocab_size: int | None) -> tuple[int, int]:
    """Scored positions per row (``seq_len - 1``: shifted logits) and logit columns (the shared-vocabulary
    cut, else the model's output width)."""
    return max(seq_len - 1, 1), vocab_size or model.get_output_embeddings().out_features


class CausalLMTask:
    """Rows of ``input_ids`` / ``attention_mask`` / ``labels`` ``(N, T)``; scored on shifted labels.

    ``loss_impl`` and ``chunk_rows``: the stage's resolved ``distill.loss_impl`` (the objective has the
    same); with ``fused`` :meth:`forward` gives :class:`HiddenStates` (final hidden states and lm_head)
    instead of logits, and evaluation computes its cross-entropy chunk by chunk too.
    """

    per_token = True
    primary_metric = "perplexity"
    unit = "tokens"

    def __init__(
        self,
        train: Batch,
        held_out: Batch,
        *,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device: torch.device,
        vocab_size: int | None = None,
        loss_impl: str = "plain",
        chunk_rows: int = 0,
    ) -> None:
        self.loss_impl, self.chunk_rows = loss_impl, chunk_rows
        self.hidden_states = loss_impl == "fused"
        self.train = {k: v.to(device) for k, v in train.items()}
        # "row" travels with every micro-batch, so a teacher-signal cache finds the rows' cached outputs.
        self.train["row"] = torch.arange(len(self.train["input_ids"]), device=device)
        self.held_out = {k: v.to(device) for k, v in held_out.items()}
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.device, self.vocab_size = device, vocab_size

    def micro_batches(self, step: int) -> list[Batch]:
        rows = len(self.train["input_ids"])
        idx = batch_indices(step, num_samples=rows, batch_size=self.batch_size, seed=self.seed).to(self.device)
        return [{k: v[chunk] for k, v in self.train.items()} for chunk in idx.chunk(self.grad_accum)]

    def count(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor | HiddenStates:
        if self.hidden_states:
            return lm_hidden_states(model, batch, self.vocab_size)
        return lm_logits(model, batch, self.vocab_size)

    def targets(self, batch: Batch) -> Targets:
        labels = batch["labels"][:, 1:]  # (B, T - 1)
        route = batch["route"][:, 1:] if "route" in batch else None  # the teacher of the predicted token
        return Targets(
            labels=labels, kd_mask=labels != IGNORE_INDEX, feature_mask=batch["attention_mask"].bool(), route=route
        )

    def continued_rows(
        self,
        batch: Batch,
        prompts: list[list[int]],
        samples: list[tuple[list[int], bool]],
        *,
        pad: int,
        eos: int | None,
    ) -> Batch:
        """On-policy rows (tasks/on_policy.py): each row's ``prompt`` ids then the student's sampled ids
        (and ``eos`` when it stopped), right-padded to the batch's width T; labels -100 on the prompt and
        the padding; ``sampled`` ``(B,)`` marks rows the teacher scores but no hard label may teach."""
        width = batch["input_ids"].shape[1]
        device = batch["input_ids"].device
        input_ids = torch.full_like(batch["input_ids"], pad)
        labels = torch.full_like(batch["labels"], IGNORE_INDEX)
        attention_mask = torch.zeros_like(batch["attention_mask"])
        for row, (prompt, (new, finished)) in enumerate(zip(prompts, samples)):
            continuation = new + ([eos] if finished and eos is not None else [])
            tokens = (prompt + continuation)[:width]
            input_ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
            labels[row, len(prompt) : len(tokens)] = torch.tensor(tokens[len(prompt) :], device=device)
            attention_mask[row, : len(tokens)] = 1
        sampled = torch.ones(len(prompts), dtype=torch.bool, device=device)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sampled": sampled}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 16) -> dict[str, float]:
        """Perplexity ``exp(mean token cross-entropy)`` over the held-out tokens, and that mean; and bits
        per character where the held-out rows carry the characters each token spells (``chars``: rows
        aligned across tokenizers), so that models of different tokenizers compare."""
        was_training = model.training
        model.eval()
        total, count, chars = 0.0, 0, 0
        rows = len(self.held_out["input_ids"])
        for start in range(0, rows, batch_size):
            batch = {k: v[start : start + batch_size] for k, v in self.held_out.items()}
            out = self.forward(model, batch)
            labels = batch["labels"][:, 1:]
            if isinstance(out, HiddenStates):  # chunk by chunk: the (B, T - 1, V) logits are never made
                total += float(
                    fused_kd_ce(out, None, labels, kd_weight=None, ce_weight=1.0, chunk_rows=self.chunk_rows).ce
                )
            else:
                logits = out.float()
                total += float(
                    nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]),
                        labels.reshape(-1),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                )
            count += int((labels != IGNORE_INDEX).sum())
            if "chars" in batch:  # the characters of the predicted tokens (a token at position 0 is not)
                chars += int(batch["chars"][:, 1:][labels != IGNORE_INDEX].sum())
        model.train(was_training)
        loss = total / max(count, 1)
        out = {"perplexity": math.exp(min(loss, 700.0)), "loss": loss}
        if "chars" in self.held_out:
            out["bits_per_char"] = total / math.log(2) / max(chars, 1)
        return out
