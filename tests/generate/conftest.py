"""A character tokenizer (the arithmetic task's) and tiny Llama models saved in temp folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distilflow.data.arith import arith_tokenizer
from distilflow.data.stdlib_corpus import tiny_llama_config
from distilflow.models.hf import build_causal_lm


def tiny_config(tokenizer, *, hidden: int = 32, layers: int = 2, max_positions: int = 64) -> dict:
    return tiny_llama_config(
        len(tokenizer),
        hidden=hidden,
        layers=layers,
        heads=4,
        max_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return arith_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random Llama (64 positions) with the arithmetic tokenizer."""
    torch.manual_seed(0)
    model = build_causal_lm(tiny_config(tokenizer))
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def greedy_reference(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence for every new token (no cache, no padding)."""
    ids = list(prompt)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            new.append(token)
            ids.append(token)
    return new
