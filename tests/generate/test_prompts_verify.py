"""Prompt sets and their errors; filters and verifiers (exact, regex, user function, a raising one)."""

from __future__ import annotations

import pytest

from distilflow.errors import UserError
from distilflow.generate.prompts import Prompt, prompt_id, read_prompts
from distilflow.generate.verify import Checker, extract_answer, load_verifier

from .conftest import write_jsonl


def test_prompts_plain_chat_answer_ids_and_duplicates(tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "1+1=", "answer": 2},
            "",
            {"messages": chat, "answer": "4"},
            {"id": "x7", "prompt": "3+3="},
            {"prompt": "1+1=", "answer": 2},  # same content: same id, kept once
        ],
    )
    got = read_prompts(path)
    assert [p.text for p in got.prompts] == ["1+1=", None, "3+3="]
    assert got.prompts[0].answer == "2" and got.prompts[1].messages == chat and got.prompts[1].answer == "4"
    assert got.prompts[2].id == "x7"
    assert got.prompts[0].id == prompt_id("1+1=", None) != prompt_id(None, chat)
    assert got.duplicates == 1
    assert got.prompts[1].where.endswith("line 3")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "not an object"),
        ('{"text": "x"}', "no usable field"),
        ('{"messages": [{"role": "user"}]}', "needs string 'role' and 'content'"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "assistant"),
        ('{"prompt": "x", "answer": [1]}', "'answer' must be"),
    ],
)
def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path, line, why):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, line, {"prompt": "fine"}])
    with pytest.raises(UserError) as info:
        read_prompts(path)
    message = str(info.value)
    assert f"{path}: line 2" in message and why in message and "\n" not in message
    skipped = read_prompts(path, on_error="skip")
    assert skipped.skipped == 1 and [p.text for p in skipped.prompts] == ["ok", "fine"]


def test_missing_or_empty_prompt_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_prompts(tmp_path / "none.jsonl")
    with pytest.raises(UserError, match="no usable prompt"):
        read_prompts(write_jsonl(tmp_path / "bad.jsonl", ["{oops"]), on_error="skip")


def test_extract_answer():
    assert extract_answer("<think>a</think> 42 ") == "42"
    assert extract_answer("work\n\nthe answer: 7\n") == "the answer: 7"
    assert extract_answer("x \\boxed{3} then \\boxed{5}", r"\\boxed\{(.+?)\}") == "5"
    assert extract_answer("no box", r"\\boxed\{(.+?)\}") is None
    assert extract_answer("   ") is None


def _prompt(answer):
    return Prompt(id="p", text="q", answer=answer)


def test_exact_and_regex_verifiers_and_filters():
    exact = Checker(verifier=load_verifier("exact"))
    assert exact(prompt=_prompt("12"), completion="<think>s</think>12", tokens=5, finish="stop").kept
    wrong = exact(prompt=_prompt("12"), completion="<think>s</think>13", tokens=5, finish="stop")
    assert (wrong.kept, wrong.reason, wrong.extracted) == (False, "wrong", "13")
    assert exact(prompt=_prompt("12"), completion="<think>s</think>12", tokens=5, finish="length").reason == "truncated"
    assert exact(prompt=_prompt(None), completion="12", tokens=5, finish="stop").reason == "no reference answer"
    regex = Checker(verifier=load_verifier("regex"))
    assert regex(prompt=_prompt(r"1\d"), completion="</think>17", tokens=3, finish="stop").kept
    assert not regex(prompt=_prompt(r"1\d"), completion="</think>170", tokens=3, finish="stop").kept
    form = Checker(verifier=None, format=r"<think>.+</think>\d+", min_tokens=2, max_tokens=10)
    assert form(prompt=_prompt(None), completion="<think>x</think>5", tokens=4, finish="stop").kept
    assert form(prompt=_prompt(None), completion="5", tokens=4, finish="stop").reason == "format"
    assert form(prompt=_prompt(None), completion="<think>x</think>5", tokens=1, finish="stop").reason == "length"
    assert form(prompt=_prompt(None), completion="<think>x</think>5", tokens=11, finish="stop").reason == "length"


def user_verifier(*, prompt, completion, answer, extracted):
    """A user verifier: the answer as an integer, any spacing; raises on a non-number."""
    return int(extracted) == int(answer)


def test_user_function_and_raising_verifier_counts_as_rejected():
    checker = Checker(verifier=load_verifier(f"{__name__}:user_verifier"))
    assert checker(prompt=_prompt("12"), completion="</think> 012", tokens=3, finish="stop").kept
    raised = checker(prompt=_prompt("12"), completion="</think> twelve", tokens=3, finish="stop")
    assert not raised.kept and raised.reason.startswith("verifier error: ValueError")


def test_verifier_spec_errors():
    with pytest.raises(UserError, match="'generate.verifier'"):
        load_verifier("fuzzy")
    with pytest.raises(UserError, match="cannot be imported"):
        load_verifier("no_such_module_xyz:f")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_verifier(f"{__name__}:nope")


def test_math_verifier_missing_is_one_line_or_works():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install math-verify"):
            load_verifier("math")
    else:
        checker = Checker(verifier=load_verifier("math"))
        assert checker(prompt=_prompt("$\\frac{1}{2}$"), completion="</think>$0.5$", tokens=3, finish="stop").kept


def two_keywords(completion, answer):
    """The signature the README shows: any subset of the keywords, by name."""
    return completion.strip().endswith(answer)


def with_default(extracted, scale=1):
    return int(extracted) * scale == 12


def any_keywords(**values):
    return sorted(values) == ["answer", "completion", "extracted", "prompt"]


def two_unknown(text, reference):
    return text == reference


def one_unknown(completion, reference):
    return completion == reference


def test_user_verifier_takes_any_subset_of_the_keywords():
    for name in ("two_keywords", "with_default", "any_keywords"):
        checker = Checker(verifier=load_verifier(f"{__name__}:{name}"))
        assert checker(prompt=_prompt("12"), completion="</think>12", tokens=3, finish="stop").kept, name
    wrong = Checker(verifier=load_verifier(f"{__name__}:two_keywords"))
    assert wrong(prompt=_prompt("12"), completion="</think>13", tokens=3, finish="stop").reason == "wrong"
    assert load_verifier(f"{__name__}:two_keywords").keywords == ("completion", "answer")


def test_user_verifier_signature_is_refused_before_generating():
    with pytest.raises(UserError, match=r"accepts none of the keywords .*its parameters: 'text', 'reference'"):
        load_verifier(f"{__name__}:two_unknown")
    with pytest.raises(UserError, match="needs parameter 'reference', which is none of the keywords"):
        load_verifier(f"{__name__}:one_unknown")
