"""The built-in LM demo's corpus: the Python standard library's own source code.

Every machine with Python has it, so the demo needs no download. Files are read in sorted order
and the held-out set is a fixed list of modules, so the split is the same on every machine with
the same Python version.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilflow.errors import UserError

# Held-out modules (a module is `name.py` or the package folder `name/`): stable, mid-sized,
# varied pure-Python modules present in every Python 3.10+.
HELD_OUT_MODULES = (
    "argparse",
    "base64",
    "bisect",
    "calendar",
    "csv",
    "difflib",
    "fractions",
    "gzip",
    "heapq",
    "json",
    "numbers",
    "pprint",
    "queue",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "tokenize",
    "uuid",
    "zipfile",
)
# Folders never read: test suites (huge, full of odd encodings) and installed third-party code.
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|endoftext|>", "<|pad|>"


@dataclass
class StdlibCorpus:
    """Documents (one per file, the last one cut at the cap) and the stdlib-relative paths they came from."""

    train: list[str]
    eval: list[str]
    train_files: list[str]
    eval_files: list[str]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Stdlib-relative POSIX paths of the ``*.py`` files, sorted, without test and third-party folders."""
    root = root or stdlib_root()
    files = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    return sorted(files)


def is_held_out(relative_path: str) -> bool:
    """True for files of the held-out modules: ``json/decoder.py``, ``csv.py``; not ``email/csv.py``."""
    top = relative_path.split("/", 1)[0]
    return top.removesuffix(".py") in HELD_OUT_MODULES


def _read_capped(root: Path, files: list[str], max_chars: int) -> tuple[list[str], list[str]]:
    texts, used, total = [], [], 0
    for relative in files:
        if total >= max_chars:
            break
        text = (root / relative).read_text(encoding="utf-8", errors="replace")
        text = text[: max_chars - total]
        if text.strip():
            texts.append(text)
            used.append(relative)
            total += len(text)
    return texts, used


def load_stdlib_corpus(*, train_chars: int, eval_chars: int, root: Path | None = None) -> StdlibCorpus:
    """Train and held-out documents, at most ``train_chars`` / ``eval_chars`` characters each.

    Files are taken in sorted path order until the cap; the file that crosses it is cut.
    """
    if train_chars <= 0 or eval_chars <= 0:
        raise UserError(f"stdlib corpus caps must be positive; got train {train_chars}, eval {eval_chars} characters")
    root = root or stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise UserError(f"found no Python files in the standard library at '{root}'")
    train, train_files = _read_capped(root, [f for f in files if not is_held_out(f)], train_chars)
    held, held_files = _read_capped(root, [f for f in files if is_held_out(f)], eval_chars)
    return StdlibCorpus(train=train, eval=held, train_files=train_files, eval_files=held_files)


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path) -> Any:
    """Train a byte-level BPE tokenizer and save it where ``AutoTokenizer.from_pretrained`` loads it.

    Special tokens: ids 0, 1, 2 are ``<|endoftext|>`` (eos), ``<|pad|>``, ``<|bos|>``. No token is
    added automatically when encoding (as GPT-2): :mod:`distilflow.data.text` appends EOS itself.
    Byte-level means any text round-trips, even characters never seen in training.
    Returns the ``PreTrainedTokenizerFast`` that was saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise UserError(f"tokenizer vocab_size {vocab_size} is too small; byte-level BPE needs at least 259")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    tie_word_embeddings: bool = True,
    bos_token_id: int = 2,
    eos_token_id: int = 0,
    pad_token_id: int = 1,
) -> dict[str, Any]:
    """A LlamaConfig as a dict (``model_type`` included) for ``build_causal_lm``; ids match :func:`train_tokenizer`.

    ``intermediate`` defaults to 8/3 x ``hidden`` rounded up to a multiple of 8, as in Llama;
    ``kv_heads`` defaults to ``heads`` (no grouped-query attention).
    """
    if hidden % heads:
        raise UserError(f"tiny llama hidden {hidden} must be a multiple of heads {heads}")
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise UserError(f"tiny llama heads {heads} must be a multiple of kv_heads {kv_heads}")
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate or 8 * ((8 * hidden // 3 + 7) // 8),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
