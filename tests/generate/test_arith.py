"""The arithmetic task: worked solutions checked by an independent evaluation (Python int arithmetic)."""

from __future__ import annotations

import re

import pytest

from distilflow.data.arith import ANSWER_PATTERN, FORMAT, arith_tokenizer, make_problems, max_tokens, worked_solution
from distilflow.errors import UserError
from distilflow.generate.verify import extract_answer


def _check_steps(operands: tuple[int, ...], solution: str) -> None:
    """Re-derive every column from the digits of the operands; the answer is Python's sum."""
    body, answer = solution.removeprefix("<think>").split("</think>")
    assert int(answer) == sum(operands) and answer == str(sum(operands))
    carry = 0
    steps = body.split(",")
    assert len(steps) == max(len(str(n)) for n in operands)
    for column, step in enumerate(steps):
        left, total = step.split("=")
        terms = [int(t) for t in left.split("+")]
        digits = [int(str(n).zfill(len(steps))[::-1][column]) for n in operands]
        assert terms == (digits + [carry] if carry else digits)
        assert int(total) == sum(terms)
        carry = int(total) // 10


def test_solutions_are_correct_for_every_difficulty():
    for digits, operands in ((1, 2), (3, 2), (4, 3), (6, 5)):
        (problems,) = make_problems([40 if digits == 1 else 300], digits=digits, operands=operands, seed=digits)
        for p in problems:
            solution = worked_solution(p.operands)
            _check_steps(p.operands, solution)
            assert re.fullmatch(FORMAT, solution)
            assert extract_answer(solution, ANSWER_PATTERN) == str(sum(p.operands)) == p.answer
            assert len(arith_tokenizer()(p.prompt + solution)["input_ids"]) + 1 <= max_tokens(digits, operands)


def test_too_many_problems_for_the_difficulty_is_refused():
    with pytest.raises(UserError, match="reasoning.digits"):
        make_problems([40, 20], digits=1, operands=2, seed=0)


def test_hand_examples():
    assert worked_solution((347, 589)) == "<think>7+9=16,4+8+1=13,3+5+1=9</think>936"
    assert worked_solution((999, 1)) == "<think>9+1=10,9+0+1=10,9+0+1=10</think>1000"
    assert worked_solution((0, 0)) == "<think>0+0=0</think>0"


def test_sets_are_disjoint_distinct_and_seeded():
    a = make_problems([50, 20, 30], digits=2, operands=2, seed=3)
    b = make_problems([50, 20, 30], digits=2, operands=2, seed=3)
    assert a == b
    flat = [p.operands for chunk in a for p in chunk]
    assert len(flat) == len(set(flat)) == 100
    assert all(0 <= n < 100 for ops in flat for n in ops)


def test_tokenizer_round_trips_one_token_per_character():
    tok = arith_tokenizer()
    text = "12+34=" + worked_solution((12, 34))
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) - len("<think>") - len("</think>") + 2
    assert tok.decode(ids) == text
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (0, 1, 2)
