"""Sampling completions from a model served by vLLM (``generate.backend: vllm`` + ``generate.server.url``).

The backend only samples; the runner applies the same filters, verifiers, dedup and resume as for
the transformers backend. Prompts are rendered and tokenized locally (``generate.model``: the folder
whose tokenizer and chat template the served model uses; its weights are not loaded) and sent as
token ids, so the server sees exactly the ids the transformers backend would feed; a probe text
tokenized on both sides refuses a server with another tokenizer.

vLLM 0.32 ``/v1/completions`` with a list of token-id prompts and ``n``: ``choices`` come prompt by
prompt, ``n`` each (``index`` = prompt * n + sample); ``return_token_ids: true`` adds the generated
ids (the eos included when one ended the completion, as ``LLM.generate``'s ``token_ids``); stop
strings are cut from the text (excluded). A request ``seed`` makes sampling reproducible (vLLM seeds
sample j of a prompt with seed + j).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distilflow.errors import UserError
from distilflow.generate.backends import Completion
from distilflow.generate.sampling import Sampling
from distilflow.models.hf import TOKENIZER_FILES
from distilflow.serving import MalformedResponse, Server, check_tokenizer, served_model


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool) -> Any:
    """The tokenizer of a local ``save_pretrained`` folder (weights not needed)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"generate.model '{folder}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); with generate.server.url "
            "it must hold the served model's tokenizer"
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)


class ServedBackend:
    """Completions from vLLM's OpenAI-compatible server; see the module docstring."""

    def __init__(
        self,
        url: str,
        tokenizer: Any,
        *,
        model: str | None = None,
        seed: int = 0,
        timeout_s: float = 600.0,
        max_retries: int = 3,
    ) -> None:
        self.server = Server(url, timeout_s=timeout_s, max_retries=max_retries, what="generation server")
        self.tokenizer, self.seed, self.calls = tokenizer, seed, 0
        info = served_model(self.server, model)
        self.model, self.max_positions = info.name, info.max_model_len
        check_tokenizer(self.server, self.model, tokenizer)

    def encode(self, text: str, *, special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def generate(self, texts: list[str], *, n: int, sampling: Sampling, special_tokens: bool) -> list[list[Completion]]:
        prompts = [self.encode(text, special_tokens=special_tokens) for text in texts]
        # vLLM refuses n > 1 with greedy decoding (400 "n must be 1 when using greedy sampling"); the n
        # greedy samples are one completion n times, as the transformers backend gives them.
        drawn = 1 if sampling.temperature == 0 else n
        payload = {
            "model": self.model,
            "prompt": prompts,
            "n": drawn,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "stop": list(sampling.stop),
            "seed": self.seed + self.calls,  # a retried request draws the same samples
            "return_token_ids": True,
            "skip_special_tokens": True,  # as the transformers backend decodes
        }
        self.calls += 1
        flat = self.server.post("/v1/completions", payload, lambda body: _completions(body, len(prompts) * drawn))
        return [flat[i * drawn : (i + 1) * drawn] * (n // drawn) for i in range(len(texts))]


def _completions(body: Any, expected: int) -> list[Completion]:
    choices = sorted(body["choices"], key=lambda choice: choice["index"])
    if len(choices) != expected:
        raise MalformedResponse(f"{len(choices)} choices; expected {expected}")
    out = []
    for choice in choices:
        text, token_ids, finish = choice["text"], choice["token_ids"], choice["finish_reason"]
        if not isinstance(text, str) or not isinstance(token_ids, list):
            raise MalformedResponse("a choice without text or token_ids")
        out.append(Completion(text, len(token_ids), "length" if finish == "length" else "stop"))
    return out
