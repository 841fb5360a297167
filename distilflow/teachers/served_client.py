"""The client of a teacher served by vLLM: top-k log-probabilities of every position of given token ids.

The teacher does not live in the training process: for a batch of token rows it asks the server's
``/v1/completions`` for *prompt* log-probabilities (``prompt_logprobs: k``, ``max_tokens: 1``) and
returns them as the sparse top-k representation the teacher-signal cache uses
(:class:`~distilflow.losses.sparse.SparseTeacher`, kind ``topk``): ids and log-probabilities
``(B, T - 1, k)``, position t predicting token t + 1, the tail ``log(1 - sum p_k)`` left to the loss.
So ``topk_divergence`` applies unchanged.

What vLLM 0.32 returns (its serving and model-runner code; checked against a running server in
tests/vllm/):

- ``choices[i].prompt_logprobs``: one entry per prompt token; the first is ``null`` (nothing predicts
  the first token); entry j is ``{token_id: {"logprob", "rank", "decoded_token"}}`` for the
  distribution that predicts token j: the k largest, plus the actual token j when it is not among
  them (so k or k + 1 entries; the top-k have ranks 1..k).
- The values are ``log_softmax`` in float32 of the model's raw logits: prompt tokens skip the
  sampler, so the request's ``temperature``/``top_p``/``top_k`` do not change them, and vLLM's
  ``--logprobs-mode`` processed_* equals raw_* for them; ``raw_logits``/``processed_logits`` would
  return logits instead (refused here: their exp sums past 1). ``-inf`` is sent as ``-9999.0``.
- ``k`` is capped by the server's ``--max-logprobs`` (default 20): a larger k is a 400.

Temperature: only T = 1. The top-k of ``softmax(z / T)`` are the same ids, but their values
``z_v / T - logsumexp(z / T)`` need the normaliser over the whole vocabulary, which a top-k slice at
T = 1 does not determine (the tail's shape is unknown); rescaling the slice would be silently wrong.

Concurrency: :meth:`TeacherClient.prefetch` sends a batch's request from a worker thread and returns
a future, so the request is in flight while the caller trains on the previous batch.
:class:`distilflow.teachers.served.ServedTeacher` is the ``TeacherSignals`` built on this client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from distilflow.errors import UserError
from distilflow.losses.sparse import SparseTeacher
from distilflow.serving import (
    ClientError,
    MalformedResponse,
    ServedModel,
    Server,
    check_tokenizer,
    check_vocab_size,
    served_model,
)

# vLLM clamps a -inf log-probability to -9999.0 in its JSON (clamp_prompt_logprobs).
NEG_INF_SENT = -9999.0
# Largest log of the top-k mass accepted as log-probabilities (float32 rounding of a mass of 1).
MASS_SLACK = 1e-3


class TeacherClient:
    """Top-k prompt log-probabilities of a model served by vLLM (see the module docstring).

    ``url``: the server's root (``http://host:port``); ``model``: the served name (None: the only
    one served); ``top_k``: ids kept per position (<= the server's ``--max-logprobs``);
    ``timeout_s`` / ``max_retries`` / ``backoff_s``: see :class:`~distilflow.serving.Server`;
    ``workers``: requests in flight at once through :meth:`prefetch`.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        top_k: int = 32,
        temperature: float = 1.0,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        workers: int = 1,
    ) -> None:
        if abs(temperature - 1.0) > 1e-12:
            raise UserError(
                f"a served teacher gives log-probabilities at temperature 1 only, not {temperature:g}: vLLM's prompt "
                "log-probabilities are the raw log_softmax, and a top-k slice cannot be re-tempered (the normaliser "
                "needs the whole vocabulary); set distill.temperature=1 or cache the teacher locally"
            )
        if top_k < 1 or workers < 1:
            raise UserError(f"served teacher: top_k and workers must be >= 1; got {top_k}, {workers}")
        self.server = Server(
            url, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, what="teacher server"
        )
        self.model, self.top_k, self.temperature = model, top_k, 1.0
        self.info: ServedModel | None = None
        self.vocab_size: int | None = None  # set by check(vocab_size=...): larger ids are refused before sending
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="served-teacher")

    # --- identity ------------------------------------------------------------------------

    def check(self, *, tokenizer: Any = None, vocab_size: int | None = None) -> ServedModel:
        """Refuse (one UserError line) a server that is not the configured teacher: the served model's
        name, its tokenizer (``tokenizer``: a probe text tokenized both ways), its vocabulary size, and
        that it gives ``top_k`` log-probabilities (``--max-logprobs``, ``--logprobs-mode``)."""
        self.info = served_model(self.server, self.model)
        self.model = self.info.name
        if tokenizer is not None:
            check_tokenizer(self.server, self.model, tokenizer)
        if vocab_size is not None:
            if self.top_k > vocab_size:
                raise UserError(f"served teacher: top_k {self.top_k} exceeds the vocabulary of {vocab_size} ids")
            check_vocab_size(self.server, self.model, vocab_size)
            self.vocab_size = vocab_size
        self.topk(torch.tensor([[0, 0]]), torch.ones(1, 2, dtype=torch.long))  # k allowed, log-probs returned
        return self.info

    # --- signals -------------------------------------------------------------------------

    def topk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SparseTeacher:
        """The teacher's top-k log-probabilities for rows ``input_ids`` ``(B, T)`` with ``attention_mask``
        ``(B, T)`` (each row's real tokens one contiguous run, e.g. right padding).

        Returns a SparseTeacher with ``ids`` int64 and ``values`` float32 of shape ``(B, T - 1, k)``,
        largest first; position t holds the distribution that predicts token t + 1. Positions whose
        next token is padding (and rows without tokens) hold the empty distribution: values ``-inf``,
        ids 0 (the loss's mask must leave them out, as it does for padding).
        """
        k = self.top_k
        batch, width = input_ids.shape
        ids = torch.zeros(batch, max(width - 1, 0), k, dtype=torch.long)
        values = torch.full((batch, max(width - 1, 0), k), -math.inf, dtype=torch.float32)
        rows, per_row = self._prompt_logprobs(input_ids, attention_mask, k, parse_prompt_logprobs)
        for (row, start, stop), (row_ids, row_values) in zip(rows, per_row):
            ids[row, start : stop - 1] = row_ids
            values[row, start : stop - 1] = row_values
        mass = torch.logsumexp(values, dim=-1)  # (B, T - 1); -inf where empty
        worst = float(mass.max()) if mass.numel() else -math.inf
        if worst > MASS_SLACK:
            raise UserError(
                f"teacher server at {self.server.url} sends top-{k} values whose probabilities sum to "
                f"{math.exp(worst):.3g} > 1: they are not log-probabilities (start vLLM with --logprobs-mode "
                "raw_logprobs, the default)"
            )
        return SparseTeacher(ids, values, "topk", self.temperature)

    def token_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``log p(token t + 1 | tokens <= t)`` ``(B, T - 1)`` float32 for rows as in :meth:`topk` (NaN where
        the next token is padding): what the teacher's perplexity is made of. One id per position is
        asked for (vLLM adds the actual token beside it)."""
        batch, width = input_ids.shape
        out = torch.full((batch, max(width - 1, 0)), math.nan, dtype=torch.float32)
        rows, per_row = self._prompt_logprobs(input_ids, attention_mask, 1, parse_token_log_probs)
        for (row, start, stop), row_values in zip(rows, per_row):
            out[row, start : stop - 1] = row_values
        return out

    def _prompt_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, parse: Callable[..., list[Any]]
    ) -> tuple[list[tuple[int, int, int]], list[Any]]:
        """Ask for ``k`` prompt log-probs of each row's real tokens; ``(row, start, stop)`` of the rows sent
        and ``parse(body, prompts, k)``'s answer for each (rows without tokens are not sent)."""
        if self.info is None:
            self.info = served_model(self.server, self.model)
            self.model = self.info.name
        input_ids, attention_mask = input_ids.cpu(), attention_mask.cpu()
        spans = _spans(attention_mask)
        rows = [(row, start, stop) for row, (start, stop) in enumerate(spans) if stop - start >= 1]
        limit = self.info.max_model_len
        longest = max((stop - start for _, start, stop in rows), default=0)
        if limit is not None and longest + 1 > limit:
            raise UserError(
                f"teacher server at {self.server.url} ('{self.model}') takes {limit} positions; a row of "
                f"{longest} tokens (+1 generated) does not fit; lower data.seq_len to at most {limit - 1}"
            )
        if self.vocab_size is not None and rows:
            largest = max(int(input_ids[row, start:stop].max()) for row, start, stop in rows)
            if largest >= self.vocab_size:
                # A vLLM started with --skip-tokenizer-init does not check ids: one past the vocabulary
                # kills its engine.
                raise UserError(
                    f"served teacher: token id {largest} is outside the teacher's {self.vocab_size}-id vocabulary"
                )
        if not rows:
            return [], []
        prompts = [input_ids[row, start:stop].tolist() for row, start, stop in rows]
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,  # vLLM refuses 0; one greedy token is the cheapest answer
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        try:
            return rows, self.server.post("/v1/completions", payload, lambda body: parse(body, prompts, k))
        except ClientError as error:
            if "max allowed" in error.detail:
                raise UserError(f"{error}; start vLLM with --max-logprobs {k} (or more)") from None
            raise

    def prefetch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Future[SparseTeacher]:
        """:meth:`topk` from a worker thread; ``.result()`` returns it (or raises its UserError).

        The tensors are copied first, so the caller may reuse its batch buffers.
        """
        return self._pool.submit(self.topk, input_ids.detach().cpu().clone(), attention_mask.detach().cpu().clone())

    def close(self) -> None:
        """Wait for requests in flight and stop the worker threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _spans(attention_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Per row, ``(start, stop)`` of its real tokens; UserError if a row's tokens are not one run."""
    spans = []
    for row, mask in enumerate(attention_mask.bool()):
        where = mask.nonzero().flatten()
        if where.numel() == 0:
            spans.append((0, 0))
            continue
        start, stop = int(where[0]), int(where[-1]) + 1
        if stop - start != where.numel():
            raise UserError(
                f"served teacher: row {row}'s attention_mask has holes; a row's tokens must be one contiguous run"
            )
        spans.append((start, stop))
    return spans


def _prompt_entries(body: Any, prompts: list[list[int]]) -> list[list[Any]]:
    """Per prompt, its ``prompt_logprobs`` list (checked: one entry per token, the first ``null``)."""
    choices = sorted(body["choices"], key=lambda choice: choice["index"])
    if len(choices) != len(prompts):
        raise MalformedResponse(f"{len(choices)} choices for {len(prompts)} prompts")
    out = []
    for choice, prompt in zip(choices, prompts):
        entries = choice["prompt_logprobs"]
        if not isinstance(entries, list) or len(entries) != len(prompt) or entries[0] is not None:
            raise MalformedResponse(f"prompt_logprobs of a {len(prompt)}-token prompt has the wrong length or head")
        out.append(entries)
    return out


def parse_prompt_logprobs(body: Any, prompts: list[list[int]], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt, top-k ids and log-probs ``(len - 1, k)``, largest first, from a completions answer."""
    out = []
    for entries, prompt in zip(_prompt_entries(body, prompts), prompts):
        row_ids: list[list[int]] = []
        row_values: list[list[float]] = []
        for position, entry in enumerate(entries[1:]):
            pairs = {int(token): float(logprob["logprob"]) for token, logprob in entry.items()}
            if len(pairs) == k + 1:  # the actual next token, outside the top k, was added beside them
                pairs.pop(prompt[position + 1], None)
            if len(pairs) != k:
                raise MalformedResponse(f"{len(entry)} log-probs at a position; expected {k} or {k + 1}")
            ordered = sorted(pairs.items(), key=lambda pair: -pair[1])  # largest first, as torch.topk
            row_ids.append([token for token, _ in ordered])
            row_values.append([value for _, value in ordered])
        ids = torch.tensor(row_ids, dtype=torch.long).reshape(len(prompt) - 1, k)
        values = torch.tensor(row_values, dtype=torch.float32).reshape(len(prompt) - 1, k)
        out.append((ids, values.masked_fill(values <= NEG_INF_SENT, -math.inf)))
    return out


def parse_token_log_probs(body: Any, prompts: list[list[int]], k: int) -> list[torch.Tensor]:
    """Per prompt, the log-probability of each actual next token ``(len - 1,)`` from a completions answer."""
    out = []
    for entries, prompt in zip(_prompt_entries(body, prompts), prompts):
        values = [float(entry[str(token)]["logprob"]) for entry, token in zip(entries[1:], prompt[1:])]
        row_values = torch.tensor(values, dtype=torch.float32)
        out.append(row_values.masked_fill(row_values <= NEG_INF_SENT, -math.inf))
    return out
