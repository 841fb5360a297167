"""Tokenizers of two families trained on stdlib text, shared by the alignment tests."""

from __future__ import annotations

import pytest

from distilflow.data.stdlib_corpus import load_stdlib_corpus, train_tokenizer
from distilflow.data.unigram_tokenizer import train_unigram_tokenizer


@pytest.fixture(scope="session")
def stdlib_pair(tmp_path_factory):
    """(student, teacher, held-out texts): unigram 4,096 (SentencePiece-like) and byte-level BPE 2,048."""
    corpus = load_stdlib_corpus(train_chars=200_000, eval_chars=40_000)
    teacher = train_tokenizer(corpus.train, 2048, tmp_path_factory.mktemp("bpe2048"))
    student = train_unigram_tokenizer(corpus.train, 4096)
    return student, teacher, corpus.eval
