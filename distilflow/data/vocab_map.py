"""The text each token id stands for, and the map between two vocabularies' ids that stand for equal text.

Two tokenizers spell the same text differently in their vocabularies: byte-level BPE (GPT-2,
Llama 3, Qwen) writes each byte as one printable character (``" def"`` is ``"Ġdef"``),
SentencePiece-style tokenizers write a space as ``"▁"`` (``"▁def"``) and unknown bytes as
``"<0x0A>"`` (byte fallback). :func:`token_bytes` undoes that spelling, so that the UTF-8 bytes of
a token can be compared across tokenizers; :func:`build_vocab_map` pairs the ids whose bytes are
equal (the "shared vocabulary" of TRL's GOLD hybrid loss, which compares raw token strings and so
misses ``"Ġdef"`` = ``"▁def"``).

Which spelling a tokenizer uses is read from its ``tokenizer.json`` decoder (``ByteLevel``,
``Metaspace``, or a ``Sequence`` with ``Replace("▁", " ")`` and ``ByteFallback`` as in Llama 2).
Other decoders (WordPiece's ``##`` continuation, which drops spaces) keep the raw token string:
two vocabularies then share only tokens spelled alike, as in GOLD.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from distilflow.errors import UserError

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table: character -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    written as characters 256 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in table.items()}


def require_fast(tokenizer: Any, role: str) -> None:
    """A one-line :class:`UserError` unless ``tokenizer`` is a fast (Rust ``tokenizers``) tokenizer.

    Alignment needs character offsets; a slow (pure-Python) tokenizer has none, and transformers
    5 silently ignores ``return_offsets_mapping`` for it rather than failing.
    """
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(
            f"the {role} tokenizer ({type(tokenizer).__name__}) is a slow tokenizer without character offsets; "
            "cross-tokenizer distillation needs a fast tokenizer (a tokenizer.json; load it with use_fast=True)"
        )


def _spelling(tokenizer: Any) -> tuple[str, str, bool]:
    """``(scheme, space_marker, byte_fallback)``: scheme ``byte_level``, ``metaspace`` or ``raw``."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    types = {part.get("type") for part in parts}
    byte_fallback = "ByteFallback" in types or bool((spec.get("model") or {}).get("byte_fallback"))
    if "ByteLevel" in types or (not decoder and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))):
        return "byte_level", "", False
    for part in parts:
        if part.get("type") == "Metaspace":
            return "metaspace", part.get("replacement", "▁"), byte_fallback
        if part.get("type") == "Replace" and part.get("content") == " ":
            return "metaspace", (part.get("pattern") or {}).get("String", "▁"), byte_fallback
    return "raw", "", byte_fallback


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """For each id ``0 .. len(tokenizer) - 1``: the UTF-8 bytes of the text the token stands for.

    None for special tokens (BOS, EOS, PAD, UNK: they stand for no text) and for tokens whose
    spelling cannot be read (a byte-level token with a character outside the byte table).
    A byte-level token may be part of a character (``"Ã"`` is the byte 0xC3). Added tokens that
    are not special stand for their literal content.
    """
    require_fast(tokenizer, "given")
    scheme, marker, byte_fallback = _spelling(tokenizer)
    decoder = byte_level_decoder()
    added = dict(tokenizer.added_tokens_decoder)
    out: list[bytes | None] = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in added:
            out.append(None if added[token_id].special else added[token_id].content.encode("utf-8"))
        elif token is None:
            out.append(None)
        elif scheme == "byte_level":
            out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token) else None)
        elif byte_fallback and BYTE_FALLBACK.match(token):
            out.append(bytes([int(token[3:5], 16)]))
        elif scheme == "metaspace":
            out.append(token.replace(marker, " ").encode("utf-8"))
        else:
            out.append(token.encode("utf-8"))
    return out


def byte_fallback_ids(tokenizer: Any) -> set[int]:
    """Ids of the ``<0xNN>`` byte-fallback tokens of a tokenizer that has them (else empty)."""
    if not _spelling(tokenizer)[2]:
        return set()
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {token_id for token_id, token in enumerate(tokens) if token and BYTE_FALLBACK.match(token)}


def _unique_index(spellings: list[bytes | None], fallback: set[int]) -> dict[bytes, int]:
    """bytes -> id for the spellings that one id has. A byte-fallback token (``<0x0A>``) yields to a
    piece of the same bytes (``\n``); two pieces of one spelling pair with nothing."""
    seen: dict[bytes, int] = {}
    twice: set[bytes] = set()
    for token_id, spelling in enumerate(spellings):
        if spelling is None or token_id in fallback:
            continue
        if spelling in seen:
            twice.add(spelling)
        seen[spelling] = token_id
    for token_id in sorted(fallback):
        seen.setdefault(spellings[token_id], token_id)
    return {spelling: token_id for spelling, token_id in seen.items() if spelling not in twice}


def _special_index(tokenizer: Any) -> dict[str, int]:
    return {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}


@dataclass
class VocabMap:
    """Pairs ``teacher_ids[k]`` <-> ``student_ids[k]`` of ids that stand for the same text, ``(K,)`` int64 each.

    Both are distinct (the map is one-to-one), sorted by teacher id. Special tokens pair by their
    content (``"<|endoftext|>"`` with ``"<|endoftext|>"``), and the two EOS tokens pair with each
    other (both mean "the document ends here") when neither is paired otherwise.
    """

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())

    def to(self, device: torch.device | str) -> VocabMap:
        return VocabMap(self.teacher_ids.to(device), self.student_ids.to(device))


def build_vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """The shared vocabulary of two tokenizers: teacher id -> student id where the token texts are equal.

    Built once per run (a pass over both vocabularies). Identical tokenizers map every id to itself.
    """
    require_fast(student_tokenizer, "student")
    require_fast(teacher_tokenizer, "teacher")
    student_index = _unique_index(token_bytes(student_tokenizer), byte_fallback_ids(student_tokenizer))
    teacher_index = _unique_index(token_bytes(teacher_tokenizer), byte_fallback_ids(teacher_tokenizer))
    pairs: dict[int, int] = {}
    for spelling, teacher_id in teacher_index.items():
        if spelling in student_index:
            pairs[teacher_id] = student_index[spelling]
    student_specials = _special_index(student_tokenizer)
    for content, teacher_id in _special_index(teacher_tokenizer).items():
        if content in student_specials:
            pairs[teacher_id] = student_specials[content]
    teacher_eos, student_eos = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
    if teacher_eos is not None and student_eos is not None:
        if teacher_eos not in pairs and student_eos not in pairs.values():
            pairs[teacher_eos] = student_eos
    teacher_ids = sorted(pairs)  # one-to-one: spellings are unique on each side, specials have no spelling
    student_ids = [pairs[teacher_id] for teacher_id in teacher_ids]
    return VocabMap(torch.tensor(teacher_ids, dtype=torch.long), torch.tensor(student_ids, dtype=torch.long))
