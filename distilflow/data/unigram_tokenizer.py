"""A second tokenizer family for the stdlib demo: a SentencePiece-style unigram tokenizer (as Llama 2, T5).

data/stdlib_corpus.py ``train_tokenizer`` makes a byte-level BPE tokenizer (as GPT-2, Llama 3,
Qwen). Cross-tokenizer distillation needs a student whose tokenizer differs in algorithm, size and
spelling: this one is a unigram model over ``▁``-marked pieces (Metaspace), with byte fallback
(``<0xNN>`` tokens) so that every text can be encoded without an unknown token, like Llama 2's.
As SentencePiece with ``split_by_whitespace`` and ``allow_whitespace_only_pieces`` (Llama 2's
settings), a piece is a word with one leading ``▁`` or a run of white space: indentation costs a
token, not one per space (on held-out stdlib code, 0.29 tokens per character at 4,096 against 0.50
when every space is its own pre-token; the demo's byte-level BPE 2,048 takes 0.31).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distilflow.errors import UserError

UNIGRAM_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
"""Ids 0..3: unknown, BOS, EOS, pad (Llama 2 order, plus a pad)."""
BYTE_TOKENS = 256


def train_unigram_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path | None = None) -> Any:
    """Train a unigram tokenizer of ``vocab_size`` ids (4 specials, 256 byte-fallback tokens, the rest
    pieces) and save it to ``out_dir`` (loadable with ``AutoTokenizer.from_pretrained``) when given.

    Special ids: 0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<pad>``; none is added when
    encoding (as :func:`distilflow.data.stdlib_corpus.train_tokenizer`). Returns the
    ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pieces = vocab_size - len(UNIGRAM_SPECIALS) - BYTE_TOKENS
    if pieces < 16:
        raise UserError(f"unigram vocab_size {vocab_size} is too small; use at least {len(UNIGRAM_SPECIALS) + 272}")
    # Spaces become "▁"; then a pre-token is a run of "▁" but its last (which starts the next word),
    # a word with at most one leading "▁", or a lone "▁".
    marker = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            pre_tokenizers.Split(Regex("▁+(?=▁)|▁?[^▁]+|▁"), "isolated"),
        ]
    )
    draft = Tokenizer(models.Unigram())
    draft.pre_tokenizer = marker
    trainer = trainers.UnigramTrainer(
        vocab_size=pieces + len(UNIGRAM_SPECIALS),
        special_tokens=list(UNIGRAM_SPECIALS),
        unk_token=UNIGRAM_SPECIALS[0],
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer)
    # The trainer has no byte fallback: add the 256 byte pieces, less likely than any trained piece,
    # so that they are used only for characters no piece covers.
    vocab = [tuple(entry) for entry in json.loads(draft.to_str())["model"]["vocab"]]
    lowest = min(score for _, score in vocab[len(UNIGRAM_SPECIALS) :])
    present = {piece for piece, _ in vocab}
    vocab += [(f"<0x{b:02X}>", lowest - 1.0) for b in range(BYTE_TOKENS) if f"<0x{b:02X}>" not in present]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tokenizer.pre_tokenizer = marker
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    tokenizer.add_special_tokens(list(UNIGRAM_SPECIALS))
    unk, bos, eos, pad = UNIGRAM_SPECIALS
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad
    )
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped
