"""Chat ``messages`` fields, shared by training data (data/text.py) and prompt files (generate/prompts.py)."""

from __future__ import annotations

from typing import Any


def chat_messages(messages: Any, error: type[Exception]) -> list[dict[str, str]]:
    """``messages`` checked to be a non-empty list of ``{role, content}`` strings and copied to plain
    dicts of those two keys; raises ``error(reason)`` (the caller's bad-line exception) when it is not."""
    if not isinstance(messages, list) or not messages:
        raise error("'messages' is not a non-empty list of {role, content} objects")
    for message in messages:
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise error(f"message {message!r} needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
