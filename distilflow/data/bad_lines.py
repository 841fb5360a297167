"""Malformed lines of a user's file (training data, prompt sets): refused in one line, or skipped and counted.

Both readers (data/text.py ``read_records``, generate/prompts.py ``read_prompts``) turn a line they
cannot read into a message ``"<file>: line N <why>"`` and hand it to one :class:`BadLines`, which
follows the reader's ``on_error``: ``raise`` refuses the first with the config key that skips such
lines, ``skip`` counts it, keeps its message and lets the reader go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distilflow.errors import UserError


@dataclass
class BadLines:
    """The bad lines of one read: ``on_error`` ("raise" or "skip", checked by the reader) and the config
    key that sets it (``skip_key``, named in the refusal); ``skipped`` and ``problems`` (one message per
    skipped line, in file order) under "skip"."""

    on_error: str
    skip_key: str = "on_error"
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, message: str) -> None:
        """One bad line (``message`` names file, line and why): a UserError under "raise", else counted."""
        if self.on_error == "raise":
            # from None: the parser's own exception (JSONDecodeError, ...) is already said in ``message``.
            raise UserError(f"{message} (set {self.skip_key}=skip to skip bad lines)") from None
        self.skipped += 1
        self.problems.append(message)
