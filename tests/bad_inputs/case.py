"""A bad-input case as data, and the command-line pieces the cases share.

A case is its files (content, or a function that writes the file given its path and the kit), a
command line with ``$name`` placeholders (``$dir`` the case folder, ``$out`` the output folder in
it, and the kit's names: ``$tokenizer``, ``$lm``, ``$onnx``, ``$mnist_cache``, ``$run``), environment
variables, and a substring the one error line must hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

Maker = Callable[[Path, Any], None]  # (path to write, kit)


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    expect: str
    files: dict[str, str | bytes | Maker] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    def materialise(self, folder: Path, kit: Any) -> tuple[list[str], dict[str, str]]:
        """Write the case's files into ``folder``; its command line and environment with placeholders filled."""
        names = {"dir": str(folder), "out": str(folder / "out"), **kit.names()}
        for name, content in self.files.items():
            path = folder / Template(name).substitute(names)
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(Template(content).safe_substitute(names), encoding="utf-8")
            else:
                content(path, kit)
        argv = [Template(arg).substitute(names) for arg in self.argv]
        env = {key: Template(value).substitute(names) for key, value in self.env.items()}
        return argv, env


def case(id: str, argv: tuple[str, ...] | list[str], expect: str, files=None, env=None) -> Case:
    return Case(id, tuple(argv), expect, dict(files or {}), dict(env or {}))


def jsonl(*rows: Any) -> str:
    """JSON lines; a str row is written as it is (a line that is not JSON)."""
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


# A tiny classifier run on the built-in MNIST-1D (the cache the tiny runs of tests/conftest.py share).
TINY = (
    "output_dir=$out",
    "data.cache_dir=$mnist_cache",
    "data.mnist1d.num_samples=200",
    "data.mnist1d.transfer_size=64",
    "threads=1",
    "teacher.model.cnn.channels=[8, 8]",
    "teacher.train.steps=2",
    "teacher.train.batch_size=32",
    "teacher.train.warmup_steps=1",
    "student.model.mlp.hidden=[32, 32]",
    "student.train.steps=3",
    "student.train.batch_size=32",
    "student.train.warmup_steps=1",
    "deploy.enabled=false",
)
RUN = ("run", *TINY, "--no-tensorboard")
# The tiny run reading a teacher-signal cache (full logits, shards of 64 rows); the kit's run folder holds
# its trained teacher and complete cache.
CACHED = (*TINY, "cache.use=true", "cache.format=full", "cache.features=true", "cache.shard_rows=64")

# A classifier on the user's own file (data.files).
_FILE_MODELS = (
    "output_dir=$out",
    "threads=1",
    "teacher.model.arch=mlp",
    "teacher.model.cnn=null",
    "teacher.model.mlp.hidden=[8]",
    "student.model.mlp.hidden=[4]",
    "teacher.train.steps=2",
    "teacher.train.batch_size=4",
    "teacher.train.warmup_steps=0",
    "student.train.steps=2",
    "student.train.batch_size=4",
    "student.train.warmup_steps=0",
    "deploy.enabled=false",
    "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
)


def run_files(source: str, path: str, *extra: str) -> tuple[str, ...]:
    """``distilflow run`` of a classifier on ``path`` (data.source npz or csv)."""
    data = (f"data.source={source}", "data.mnist1d=null", f"data.files.path={path}")
    return ("run", *data, *_FILE_MODELS, *extra, "--no-tensorboard")


# Tiny causal LMs (hidden 16, one layer) on the kit's character tokenizer (18 ids).
_LLAMA = (
    "{model_type: llama, vocab_size: 18, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
    "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64, tie_word_embeddings: true, "
    "bos_token_id: 2, eos_token_id: 0, pad_token_id: 1}"
)
LM_MODELS = (
    "output_dir=$out",
    "threads=1",
    "teacher.model.arch=hf",
    "teacher.model.cnn=null",
    f"teacher.model.hf.config={_LLAMA}",
    "student.model.arch=hf",
    "student.model.mlp=null",
    f"student.model.hf.config={_LLAMA}",
    "teacher.train.steps=2",
    "teacher.train.batch_size=2",
    "teacher.train.warmup_steps=0",
    "student.train.steps=2",
    "student.train.batch_size=2",
    "student.train.warmup_steps=0",
    "deploy.enabled=false",
    "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
)


# Forty short documents (one a line): enough records for the held-out split and the packed rows.
LINES = jsonl(*({"text": f"{i}+{i}={2 * i}"} for i in range(40)))


def run_text(path: str, *extra: str) -> tuple[str, ...]:
    """``distilflow run`` of a tiny causal LM on the text file(s) at ``path`` (data.source text)."""
    data = ("data.source=text", "data.mnist1d=null", f"data.text.path={path}", "data.text.tokenizer=$tokenizer")
    return ("run", *data, "data.text.seq_len=8", *LM_MODELS, *extra, "--no-tensorboard")


def generate(*extra: str) -> tuple[str, ...]:
    """``distilflow generate`` with the kit's tiny Llama writing into the output folder."""
    return ("generate", "output_dir=$out", "threads=1", "generate.model=$lm", "generate.max_new_tokens=4", *extra)
