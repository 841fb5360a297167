"""Filters (length, format) and verifiers (exact, regex, math-verify, a user function) of completions.

A completion is *kept* when every filter passes and the verifier accepts its extracted final
answer. Every rejection carries a short reason (``"truncated"``, ``"format"``, ``"wrong"``,
``"verifier error: ..."``) that the run counts and reports. A verifier that raises rejects that
completion only; the run goes on, unless it raised on every sample of the first batch (a verifier
that cannot work: the run stops with one line, before that batch is written).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distilflow.errors import UserError

THINK_END = "</think>"
BUILTIN_VERIFIERS = ("none", "exact", "regex", "math")


def extract_answer(completion: str, pattern: str | None = None) -> str | None:
    """The final answer of a completion.

    With ``pattern`` (a regex): its first group (or whole match) at the last place it matches.
    Without: the text after the last ``</think>`` when there is one, else the last non-empty line.
    None when nothing is found.
    """
    if pattern is not None:
        matches = list(re.finditer(pattern, completion))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.groups() else last.group(0)).strip()
    if THINK_END in completion:
        answer = completion.rsplit(THINK_END, 1)[1].strip()
        return answer or None
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


def normalize(text: str) -> str:
    """Whitespace collapsed; what exact match compares."""
    return " ".join(text.split())


def exact_match(extracted: str, answer: str) -> bool:
    return normalize(extracted) == normalize(answer)


def regex_match(extracted: str, answer: str) -> bool:
    """The reference ``answer`` is a regex that must match the whole extracted answer."""
    return re.fullmatch(answer, extracted.strip()) is not None


def math_match(extracted: str, answer: str) -> bool:
    """Mathematical equivalence by math-verify (``pip install math-verify``)."""
    from math_verify import parse, verify

    return bool(verify(parse(answer), parse(extracted)))


VerifierFn = Callable[[str, str], bool]


def load_verifier(spec: str) -> VerifierFn | _UserVerifier | None:
    """The verifier named by ``generate.verifier``: none, exact, regex, math, or 'module:function'.

    A user function is called with keywords: ``prompt`` (the prompt text, or its chat messages),
    ``completion``, ``answer`` (the reference, may be None) and ``extracted`` (the final answer found
    in the completion, may be None); it may take any of them (or ``**kwargs``) and returns a truth
    value. Its signature is checked here, before anything is generated.
    """
    if spec == "none":
        return None
    if spec == "exact":
        return exact_match
    if spec == "regex":
        return regex_match
    if spec == "math":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise UserError(
                "generate.verifier 'math' needs the math-verify package: pip install math-verify "
                "(or pip install 'distilflow[math]'); or use exact, regex or a module:function"
            ) from None
        return math_match
    if ":" not in spec:
        raise UserError(
            f"config key 'generate.verifier': {spec!r} is not allowed; use {', '.join(BUILTIN_VERIFIERS)} "
            "or 'module.path:function'"
        )
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"generate.verifier {spec!r}: module '{module_name}' cannot be imported ({error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"generate.verifier {spec!r}: '{module_name}' has no function '{name}'")
    return _UserVerifier(fn, spec, _keywords(fn, spec))


# The keywords a user's verifier is called with; it may take any of them (or **kwargs).
VERIFIER_KEYWORDS = ("prompt", "completion", "answer", "extracted")


def _keywords(fn: Callable[..., Any], spec: str) -> tuple[str, ...]:
    """The keywords of VERIFIER_KEYWORDS that ``fn`` takes; refused with one line (before anything is
    generated) when it takes none of them or needs an argument none of them gives."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: call them with every keyword
        return VERIFIER_KEYWORDS
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return VERIFIER_KEYWORDS
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    taken = tuple(k for k in VERIFIER_KEYWORDS if any(p.name == k and p.kind in by_keyword for p in parameters))
    names = ", ".join(VERIFIER_KEYWORDS)
    listed = ", ".join(f"'{p.name}'" for p in parameters) or "no parameters"
    if not taken:
        raise UserError(
            f"generate.verifier {spec!r} accepts none of the keywords it is called with ({names}); its "
            f"parameters: {listed}. Write e.g. def check(completion, answer): ..."
        )
    required = [
        p.name
        for p in parameters
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in taken
    ]
    if required:
        raise UserError(
            f"generate.verifier {spec!r} needs parameter '{required[0]}', which is none of the keywords it is "
            f"called with ({names}); give it a default or rename it"
        )
    return taken


@dataclass
class _UserVerifier:
    """A user's ``module:function``, called with the keywords of VERIFIER_KEYWORDS it takes."""

    fn: Callable[..., Any]
    spec: str
    keywords: tuple[str, ...]

    def __call__(self, **values: Any) -> Any:
        return self.fn(**{k: values[k] for k in self.keywords})


@dataclass
class Verdict:
    kept: bool
    reason: str  # "kept" or why it was rejected
    extracted: str | None = None


@dataclass
class Checker:
    """Filters then verifier, as configured in the ``generate:`` section."""

    verifier: VerifierFn | _UserVerifier | None = None
    answer_pattern: str | None = None
    format: str | None = None  # a regex the whole completion must match (re.DOTALL)
    min_tokens: int = 1
    max_tokens: int | None = None
    keep_truncated: bool = False

    def __post_init__(self) -> None:
        for key, pattern in (("answer_pattern", self.answer_pattern), ("format", self.format)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise UserError(
                        f"config key 'generate.{key}': {pattern!r} is not a valid regex ({error})"
                    ) from None
        self._format = re.compile(self.format, re.DOTALL) if self.format is not None else None

    def __call__(self, *, prompt: Any, completion: str, tokens: int, finish: str) -> Verdict:
        if finish == "length" and not self.keep_truncated:
            return Verdict(False, "truncated")
        if tokens < self.min_tokens or (self.max_tokens is not None and tokens > self.max_tokens):
            return Verdict(False, "length")
        if self._format is not None and self._format.fullmatch(completion) is None:
            return Verdict(False, "format")
        extracted = extract_answer(completion, self.answer_pattern)
        if self.verifier is None:
            return Verdict(True, "kept", extracted)
        user = isinstance(self.verifier, _UserVerifier)
        if not user and (extracted is None or prompt.answer is None):
            return Verdict(False, "no answer" if extracted is None else "no reference answer", extracted)
        try:
            if user:
                ok = self.verifier(
                    prompt=prompt.text if prompt.messages is None else prompt.messages,
                    completion=completion,
                    answer=prompt.answer,
                    extracted=extracted,
                )
            else:
                ok = self.verifier(extracted, prompt.answer)  # type: ignore[operator]
        except Exception as error:  # a user verifier may raise anything; it rejects this one sample
            return Verdict(False, f"verifier error: {type(error).__name__}: {error}"[:200], extracted)
        return Verdict(bool(ok), "kept" if ok else "wrong", extracted)
