"""Tiny Llama, Qwen2 and GPT-2 models and a tokenizer trained on a few stdlib files, all in temp folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from distilflow.data.stdlib_corpus import stdlib_root, tiny_llama_config, train_tokenizer
from distilflow.models.hf import build_causal_lm

FAMILIES = ("llama", "qwen2", "gpt2")
TRAIN_FILES = ("bisect.py", "heapq.py", "keyword.py")  # small, present in every Python 3


def family_config(family: str, vocab_size: int, *, layers: int = 2, hidden: int = 32) -> dict:
    """A tiny config dict of ``family``; eos 0 / pad 1 / bos 2 as in train_tokenizer."""
    if family == "llama":
        return tiny_llama_config(vocab_size, hidden=hidden, layers=layers, heads=4, max_positions=64)
    if family == "qwen2":
        return {
            "model_type": "qwen2",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            "tie_word_embeddings": False,
            "bos_token_id": 2,
            "eos_token_id": 0,
        }
    return {
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": 4,
        "n_positions": 48,
        "bos_token_id": 2,
        "eos_token_id": 0,
    }


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [(stdlib_root() / name).read_text(encoding="utf-8") for name in TRAIN_FILES]
    train_tokenizer(texts, 320, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """family -> folder holding a saved tiny model and the tokenizer."""
    dirs = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = build_causal_lm(family_config(family, len(tokenizer)))
        out = tmp_path_factory.mktemp(family)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[family] = out
    return dirs
