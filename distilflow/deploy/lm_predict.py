"""``distilflow predict MODEL_FOLDER PROMPT``: streaming generation from a language model folder.

Two backends behind one interface: an ONNX Runtime GenAI folder (``genai_config.json``, written by
the deploy stage with ``deploy.genai.enabled``) runs on ``onnxruntime_genai``; a Hugging Face folder
(``config.json`` + weights, e.g. ``runs/<name>/student/hf``) runs on transformers with its KV cache
as the fallback. Greedy or sampled (temperature, top-k, top-p, seed), at most ``max_new_tokens``,
cut before the first stop string; a prompt is wrapped in the chat template when the tokenizer has
one (unless ``raw``). Prompts come from the text itself, a text file (one prompt, or one per line
with ``each_line``) or a JSONL file (``{"prompt": ...}`` per line).
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from distilflow.deploy.genai import is_genai_folder, open_model, read_genai_config
from distilflow.errors import UserError


@dataclass
class Sampling:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)


def check_sampling(s: Sampling) -> None:
    """Bad sampling settings as one line naming the option."""
    if s.temperature <= 0:
        raise UserError(f"--temperature {s.temperature} is not allowed; use a value > 0")
    if not 0 < s.top_p <= 1:
        raise UserError(f"--top-p {s.top_p} is not allowed; use a value in (0, 1]")
    if s.top_k < 0:
        raise UserError(f"--top-k {s.top_k} is not allowed; use 0 (all tokens) or more")


def read_prompts(source: str, *, each_line: bool = False) -> tuple[list[str], bool]:
    """The prompts of ``source`` and whether they came from JSONL (then the output is JSONL too)."""
    path = Path(source)
    try:
        is_file = path.is_file()
    except OSError:  # text longer than a file name can be
        is_file = False
    if not is_file:
        return [source], False
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"'{path}' line {number} is not JSON; each line needs {{\"prompt\": ...}}") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f"'{path}' line {number} has no string 'prompt'")
            prompts.append(row["prompt"])
        if not prompts:
            raise UserError(f"'{path}' holds no prompts")
        return prompts, True
    prompts = [line for line in text.splitlines() if line.strip()] if each_line else [text]
    if not prompts or not any(p.strip() for p in prompts):
        raise UserError(f"'{path}' is empty; give some text")
    return prompts, False


class StopFilter:
    """Streamed text up to the first stop string; text that may begin a stop string is held back."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.held += piece
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.held = self.held[: min(hits)], ""
            return out
        keep = max((k for s in self.stop for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out) :]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class GenaiBackend:
    """An ONNX Runtime GenAI folder: its tokenizer, generator and search options."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        self.model = open_model(folder, threads)
        import onnxruntime_genai as og

        self.og = og
        self.tokenizer = og.Tokenizer(self.model)
        self.positions = read_genai_config(folder)["model"]["context_length"]
        self.chat = _has_chat_template(folder)

    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat and self.chat:
            prompt = self.tokenizer.apply_chat_template(
                json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
            )
        return [int(t) for t in self.tokenizer.encode(prompt)]

    def tokens(self, ids: list[int], s: Sampling) -> Iterator[str]:
        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": min(len(ids) + s.max_new_tokens, self.positions)}
        options |= {"do_sample": s.do_sample, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
        if s.do_sample:
            options["random_seed"] = s.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        stream = self.tokenizer.create_stream()
        eos = set(int(t) for t in self.tokenizer.eos_token_ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                return
            yield stream.decode(token)


class TransformersBackend:
    """A Hugging Face folder on transformers: a token-by-token loop over its KV cache."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from distilflow.models.hf import no_progress_bars
        from distilflow.tasks.causal_lm import load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = load_tokenizer(folder, what="model folder")
        try:
            with no_progress_bars():
                self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).float().eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"'{folder}' could not be loaded as a causal LM: {str(exc).splitlines()[0]}") from None
        config = self.model.config
        self.positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat and self.chat:
            messages = [{"role": "user", "content": prompt}]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(prompt)["input_ids"])

    def tokens(self, ids: list[int], s: Sampling) -> Iterator[str]:
        torch = self.torch
        generator = torch.Generator().manual_seed(s.seed)
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        cache, step_ids, text = None, torch.tensor([ids]), ""
        # transformers 5 names the KV cache argument and output 'cache' (4.x: 'past_key_values').
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for _ in range(min(s.max_new_tokens, self.positions - len(ids))):
                out = self.model(input_ids=step_ids, use_cache=True, **({key: cache} if cache is not None else {}))
                cache, logits = out[key], out.logits[0, -1].float()  # (V,)
                token = _choose(logits, s, generator)
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


def _choose(logits: Any, s: Sampling, generator: Any) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    torch = sys.modules["torch"]
    if not s.do_sample:
        return int(logits.argmax())
    logits = logits / max(s.temperature, 1e-6)
    if 0 < s.top_k < logits.numel():
        cutoff = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= s.top_p  # tokens after the nucleus is full
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def open_backend(model: str | Path, threads: int = 0) -> GenaiBackend | TransformersBackend:
    folder = Path(model)
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist")
    if is_genai_folder(folder):
        return GenaiBackend(folder, threads)
    if (folder / "config.json").is_file():
        return TransformersBackend(folder, threads)
    raise UserError(
        f"'{folder}' is not a model folder: expected genai_config.json (ONNX Runtime GenAI) "
        "or config.json with weights (Hugging Face)"
    )


def complete(
    backend: GenaiBackend | TransformersBackend, prompt: str, s: Sampling, *, chat: bool = True
) -> Iterator[str]:
    """Stream the continuation of ``prompt``, ending before the first stop string."""
    ids = backend.encode(prompt, chat)
    if not ids:
        raise UserError("the prompt is empty after tokenisation; give some text")
    if len(ids) >= backend.positions:
        raise UserError(
            f"the prompt has {len(ids)} tokens; the model has {backend.positions} positions, so at most "
            f"{backend.positions - 1} prompt tokens leave room to generate"
        )
    stop = StopFilter(s.stop)
    for piece in backend.tokens(ids, s):
        text = stop.feed(piece)
        if text:
            yield text
        if stop.stopped:
            return
    tail = stop.flush()
    if tail:
        yield tail


def predict_lm(
    model: str,
    source: str,
    s: Sampling,
    *,
    each_line: bool = False,
    chat: bool = True,
    threads: int = 0,
    out: TextIO | None = None,
) -> int:
    """What ``distilflow predict`` does for a model folder: stream each completion to ``out``."""
    out = out or sys.stdout
    prompts, as_jsonl = read_prompts(source, each_line=each_line)
    backend = open_backend(model, threads)
    for index, prompt in enumerate(prompts):
        if as_jsonl:
            text = "".join(complete(backend, prompt, s, chat=chat))
            out.write(json.dumps({"prompt": prompt, "completion": text}) + "\n")
            continue
        if len(prompts) > 1:
            out.write(f"--- prompt {index + 1}: {prompt}\n")
        for piece in complete(backend, prompt, s, chat=chat):
            out.write(piece)
            out.flush()
        out.write("\n")
    return 0
