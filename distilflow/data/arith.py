"""Synthetic reasoning task: multi-operand, multi-digit addition with written-out column steps.

A problem ``347+589=`` has the worked solution (the completion)::

    <think>7+9=16,4+8+1=13,3+5+1=9</think>936

one step per column, least significant first: the column's digits (0 for a shorter operand), plus
the carry from the previous column when it is not 0, equals the column sum. The final answer
follows ``</think>``. Difficulty: ``digits`` per operand and the number of ``operands``. Answers
are checked by exact match against Python's integer sum. Text is tokenized one character per
token (``<think>`` and ``</think>`` are single tokens) by :func:`arith_tokenizer`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distilflow.errors import UserError

THINK, END_THINK = "<think>", "</think>"
CHARS = "0123456789+=,"
EOS, PAD, BOS = "<eos>", "<pad>", "<bos>"
ANSWER_PATTERN = r"</think>(\d+)$"  # generate.answer_pattern for this task
FORMAT = r"<think>\d+(\+\d+)+=\d+(,\d+(\+\d+)+=\d+)*</think>\d+"  # generate.format for this task


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(map(str, self.operands)) + "="

    @property
    def answer(self) -> str:
        return str(sum(self.operands))

    @property
    def solution(self) -> str:
        return worked_solution(self.operands)


def worked_solution(operands: tuple[int, ...] | list[int]) -> str:
    """The column-by-column completion of ``operands`` (see the module docstring)."""
    columns = max(len(str(n)) for n in operands)
    steps, carry = [], 0
    for column in range(columns):
        digits = [(n // 10**column) % 10 for n in operands]
        terms = [*digits, carry] if carry else digits
        total = sum(terms)
        steps.append("+".join(map(str, terms)) + f"={total}")
        carry = total // 10
    # The answer is written from the steps: each column's last digit, then the final carry.
    answer = "".join(str(int(step.rsplit("=", 1)[1]) % 10) for step in reversed(steps))
    answer = (str(carry) if carry else "") + answer
    return f"{THINK}{','.join(steps)}{END_THINK}{int(answer)}"


def make_problems(counts: list[int], *, digits: int, operands: int, seed: int) -> list[list[Problem]]:
    """Disjoint sets of distinct problems, one per entry of ``counts``, drawn by ``seed``.

    Each operand is uniform in ``[0, 10**digits)``.
    """
    rng = random.Random(seed)
    space = (10**digits) ** operands
    if sum(counts) > space // 2:
        raise UserError(
            f"reasoning: {sum(counts)} distinct problems requested but {operands} operands of {digits} digits "
            f"allow only {space}; raise reasoning.digits or lower the problem counts (at most {space // 2} in all)"
        )
    seen: set[tuple[int, ...]] = set()
    out = []
    for count in counts:
        chunk = []
        while len(chunk) < count:
            numbers = tuple(rng.randrange(10**digits) for _ in range(operands))
            if numbers not in seen:
                seen.add(numbers)
                chunk.append(Problem(numbers))
        out.append(chunk)
    return out


def max_tokens(digits: int, operands: int) -> int:
    """Prompt + completion + EOS length bound in tokens (characters, think tags one token each)."""
    prompt = operands * (digits + 1)
    column_sum = len(str(9 * operands + operands))  # digits of the largest column total
    step = (operands + 1) * 2 + column_sum  # up to operands+1 one-digit terms, '+'s, '=', the sum
    answer = digits + 1
    return prompt + 2 + digits * (step + 1) + answer + 2


def arith_tokenizer(out_dir: str | Path | None = None) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` for the task; saved to ``out_dir`` if given.

    Ids 0, 1, 2 are eos, pad, bos (as the stdlib demo tokenizer). Encoding adds no special token.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([EOS, PAD, BOS, THINK, END_THINK, *CHARS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_tokens([AddedToken(THINK, normalized=False), AddedToken(END_THINK, normalized=False)])
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in (EOS, PAD, BOS)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    if out_dir is not None:
        wrapped.save_pretrained(str(out_dir))
    return wrapped
