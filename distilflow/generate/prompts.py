"""Prompt sets: JSONL lines with ``prompt`` (a string) or chat ``messages``, and an optional ``answer``.

Each prompt gets a stable ``id``: the line's own ``id`` field when it has one, else a hash of its
content, so that the same prompt written twice is generated once and a resumed run recognises
the prompts it has finished.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distilflow.data.bad_lines import BadLines
from distilflow.data.chat import chat_messages
from distilflow.data.text import read_utf8
from distilflow.errors import UserError

FIELDS_HINT = "expected 'prompt' (a string) or 'messages' (a list of {role, content}), optional 'answer'"


@dataclass
class Prompt:
    """One prompt: ``text`` or chat ``messages``; ``answer`` is the reference the verifier uses."""

    id: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    answer: str | None = None
    where: str = ""  # "file: line N", for error messages

    def as_record(self) -> dict[str, Any]:
        """The prompt's fields as written to the output file."""
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = self.messages
        else:
            out["prompt"] = self.text
        if self.answer is not None:
            out["answer"] = self.answer
        return out


@dataclass
class PromptSet:
    prompts: list[Prompt]
    skipped: int = 0  # malformed lines skipped with on_error="skip"
    duplicates: int = 0  # lines whose id was already seen
    problems: list[str] = field(default_factory=list)


class _BadLine(Exception):
    pass


def _prompt_from_row(row: Any) -> tuple[str | None, list[dict[str, str]] | None, str | None, str | None]:
    if not isinstance(row, dict):
        raise _BadLine(f"is a JSON {type(row).__name__}, not an object; {FIELDS_HINT}")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise _BadLine("'answer' must be a string or a number")
    answer = None if answer is None else str(answer)
    given_id = row.get("id")
    if given_id is not None and not isinstance(given_id, (str, int)):
        raise _BadLine("'id' must be a string or an integer")
    given_id = None if given_id is None else str(given_id)
    if row.get("messages") is not None:
        messages = chat_messages(row["messages"], _BadLine)
        if messages[-1]["role"] == "assistant":
            raise _BadLine("the last message is the assistant's; a prompt ends with a user (or system) message")
        return None, messages, answer, given_id
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"], None, answer, given_id
    raise _BadLine(f"has no usable field; {FIELDS_HINT}")


def prompt_id(text: str | None, messages: list[dict[str, str]] | None) -> str:
    content = json.dumps(messages if messages is not None else text, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def read_prompts(path: str | Path, *, on_error: str = "raise") -> PromptSet:
    """Prompts of a JSONL file in order, each id once.

    A malformed line is a :class:`UserError` naming the file and line, or with ``on_error="skip"``
    it is skipped and counted. Blank lines are ignored. No prompt left is a :class:`UserError`.
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error {on_error!r} is not allowed; use raise or skip")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompt file '{file}' does not exist; give a JSONL file ({FIELDS_HINT})")
    out = PromptSet(prompts=[])
    bad = BadLines(on_error, skip_key="generate.on_error")
    seen: set[str] = set()
    for number, line in enumerate(read_utf8(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise _BadLine(f"is not valid JSON ({error.msg})") from None
            text, messages, answer, given_id = _prompt_from_row(row)
        except _BadLine as error:
            bad.add(f"{file}: line {number} {error}")
            continue
        pid = given_id if given_id is not None else prompt_id(text, messages)
        if pid in seen:
            out.duplicates += 1
            continue
        seen.add(pid)
        out.prompts.append(Prompt(pid, text, messages, answer, f"{file}: line {number}"))
    out.skipped, out.problems = bad.skipped, bad.problems
    if not out.prompts:
        raise UserError(f"prompt file '{file}' has no usable prompt ({out.skipped} bad lines skipped); {FIELDS_HINT}")
    return out


def render_prompt(prompt: Prompt, tokenizer: Any, *, chat_template: bool) -> str:
    """The text the model continues: chat messages (or a plain prompt when ``chat_template``) rendered
    with the tokenizer's chat template and its generation prompt; else the plain prompt as is."""
    if prompt.messages is None and not chat_template:
        return prompt.text or ""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{prompt.where}: chat prompts need a tokenizer with a chat_template; set generate.chat_template=false "
            "and use plain 'prompt' lines, or give a model whose tokenizer has one"
        )
    messages = prompt.messages if prompt.messages is not None else [{"role": "user", "content": prompt.text or ""}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
