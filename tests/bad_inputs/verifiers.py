"""Users' verifiers (``generate.verifier: bad_inputs.verifiers:NAME``) for the bad-input corpus."""

from __future__ import annotations

NOT_A_FUNCTION = 3


def positional_only(text, reference, /):
    """Takes its arguments by position: none of the keywords can reach it."""
    return text == reference


def unknown_names(text, reference):
    """Required parameters that are none of prompt, completion, answer, extracted."""
    return text == reference


def no_parameters():
    return True


def always_raises(completion, answer):
    """Accepts two of the keywords, then fails on every sample."""
    raise KeyError("score")
