"""``distilflow predict MODEL_FOLDER PROMPT``: streaming generation from a language model folder.

Two backends behind one interface (``prompt_ids``, ``stream``, ``positions``): an ONNX Runtime GenAI
folder (``genai_config.json``, written by the deploy stage with ``deploy.genai.enabled``) runs on
``onnxruntime_genai`` (:class:`GenaiBackend`); a Hugging Face folder (``config.json`` + weights, e.g.
``runs/<name>/student/hf``) runs on transformers with its KV cache as the fallback (the
``TransformersBackend`` of distilflow/generate/backends.py, which ``distilflow generate`` uses too).
Greedy or sampled (generate/sampling.py: temperature, top-k, top-p, seed), at most
``max_new_tokens``, cut before the first stop string; a prompt is wrapped in the chat template when
the tokenizer has one (unless ``raw``). Prompts come from the text itself, a text file (one prompt, or one per line
with ``each_line``) or a JSONL file (``{"prompt": ...}`` per line).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from distilflow.deploy.genai import is_genai_folder, open_model, read_genai_config
from distilflow.errors import UserError
from distilflow.generate.sampling import Sampling


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

    def prompt_ids(self, prompt: str, chat: bool) -> list[int]:
        """``prompt`` in the folder's chat template when ``chat`` and it has one, tokenized."""
        if chat and self.chat:
            prompt = self.tokenizer.apply_chat_template(
                json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
            )
        return [int(token) for token in self.tokenizer.encode(prompt)]

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[str]:
        """The text of one completion of ``ids``, piece by piece (GenAI's search: greedy or sampled)."""
        params = self.og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": min(len(ids) + sampling.max_new_tokens, self.positions)}
        # GenAI takes a temperature even for greedy search; 1.0 is its neutral value.
        temperature = 1.0 if sampling.greedy else sampling.temperature
        options |= {"do_sample": not sampling.greedy, "temperature": temperature}
        options |= {"top_k": sampling.top_k, "top_p": sampling.top_p}
        if not sampling.greedy:
            options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        stream = self.tokenizer.create_stream()
        eos = set(int(token) for token in self.tokenizer.eos_token_ids)
        while not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in eos:
                return
            yield stream.decode(token)


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def open_backend(model: str | Path, threads: int = 0) -> Any:
    """A :class:`GenaiBackend` for an ONNX Runtime GenAI folder, else the transformers backend of
    distilflow/generate/backends.py for a Hugging Face folder (imported only then: torch stays out of
    a GenAI predict)."""
    folder = Path(model)
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist")
    if is_genai_folder(folder):
        return GenaiBackend(folder, threads)
    if (folder / "config.json").is_file():
        from distilflow.generate.backends import TransformersBackend

        return TransformersBackend.from_folder(folder, threads)
    raise UserError(
        f"'{folder}' is not a model folder: expected genai_config.json (ONNX Runtime GenAI) "
        "or config.json with weights (Hugging Face)"
    )


def complete(backend: Any, prompt: str, sampling: Sampling, *, chat: bool = True) -> Iterator[str]:
    """Stream the continuation of ``prompt`` from a backend of :func:`open_backend`, ending before the
    first stop string."""
    ids = backend.prompt_ids(prompt, chat)
    if not ids:
        raise UserError("the prompt is empty after tokenisation; give some text")
    if len(ids) >= backend.positions:
        raise UserError(
            f"the prompt has {len(ids)} tokens; the model has {backend.positions} positions, so at most "
            f"{backend.positions - 1} prompt tokens leave room to generate"
        )
    stop = StopFilter(sampling.stop)
    for piece in backend.stream(ids, sampling):
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
    sampling: Sampling,
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
            text = "".join(complete(backend, prompt, sampling, chat=chat))
            out.write(json.dumps({"prompt": prompt, "completion": text}) + "\n")
            continue
        if len(prompts) > 1:
            out.write(f"--- prompt {index + 1}: {prompt}\n")
        for piece in complete(backend, prompt, sampling, chat=chat):
            out.write(piece)
            out.flush()
        out.write("\n")
    return 0
