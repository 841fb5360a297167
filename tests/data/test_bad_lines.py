"""BadLines: the one skip-or-raise rule of the readers of user files (data/text.py, generate/prompts.py)."""

from __future__ import annotations

import json

import pytest

from distilflow.data.bad_lines import BadLines
from distilflow.data.text import read_records
from distilflow.errors import UserError
from distilflow.generate.prompts import read_prompts


def test_raise_refuses_the_first_line_with_the_key_that_skips_it():
    bad = BadLines("raise", skip_key="generate.on_error")
    try:
        raise ValueError("the parser's own error")
    except ValueError:
        with pytest.raises(UserError) as info:
            bad.add("p.jsonl: line 2 is not valid JSON")
    assert str(info.value) == "p.jsonl: line 2 is not valid JSON (set generate.on_error=skip to skip bad lines)"
    assert info.value.__suppress_context__  # the CLI prints one line, no chained traceback
    assert (bad.skipped, bad.problems) == (0, [])


def test_skip_counts_every_line_in_order():
    bad = BadLines("skip")
    for number in (3, 7):
        bad.add(f"d.jsonl: line {number} has no usable field")
    assert bad.skipped == 2
    assert bad.problems == ["d.jsonl: line 3 has no usable field", "d.jsonl: line 7 has no usable field"]


def test_both_readers_name_their_own_key_and_count_alike(tmp_path):
    """Training data names ``on_error`` (data.<source>.on_error), prompt sets ``generate.on_error``."""
    path = tmp_path / "lines.jsonl"
    path.write_text("\n".join(['{"prompt": "a", "completion": "b"}', "{oops", json.dumps([1])]) + "\n")
    expected = [f"{path}: line 2 is not valid JSON (Expecting property name enclosed in double quotes)"]
    with pytest.raises(UserError) as data_error:
        read_records(path)
    with pytest.raises(UserError) as prompt_error:
        read_prompts(path)
    assert str(data_error.value) == f"{expected[0]} (set on_error=skip to skip bad lines)"
    assert str(prompt_error.value) == f"{expected[0]} (set generate.on_error=skip to skip bad lines)"
    records, prompts = read_records(path, on_error="skip"), read_prompts(path, on_error="skip")
    assert (records.skipped, prompts.skipped) == (2, 2)
    assert records.problems[0] == prompts.problems[0] == expected[0]
    assert records.problems[1].startswith(f"{path}: line 3 is a JSON list, not an object")
