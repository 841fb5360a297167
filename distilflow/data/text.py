"""Text data for causal LMs: local files -> records -> ``input_ids`` / ``attention_mask`` / ``labels``.

Formats (local files only; a folder means every supported file under it, sorted):

- ``.txt``: the whole file is one document (a folder of ``.txt`` files is a corpus of documents).
- ``.jsonl``: one JSON object per line with ``text``; or ``prompt`` and ``completion``; or chat
  ``messages`` (a list of ``{role, content}``) whose last message is the assistant's completion.
- ``.parquet`` / ``.csv``: the same fields as columns, read with ``datasets.load_dataset``.

Only completion tokens are scored: prompt tokens and padding get label ``IGNORE_INDEX`` (-100).

Routing (several teachers, ``data.teacher_column``): a field of each JSONL line or table row names
the teacher the record is distilled from; :func:`read_records` turns it into the teacher's index
(``NO_ROUTE`` = -1 where the field is missing, null or empty) and :func:`tokenize` gives every
token its record's index (``route``, aligned with ``input_ids``), so a packed row that spans two
records sends each record's tokens to its own teacher.
"""

from __future__ import annotations

import json
import random
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.data.bad_lines import BadLines
from distilflow.data.chat import chat_messages
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX
from distilflow.models.hf import max_positions

SUPPORTED = (".txt", ".jsonl", ".parquet", ".csv")
NO_ROUTE = -1
ON_ERROR = ("raise", "skip")
FIELDS_HINT = "expected 'text', or 'prompt' and 'completion', or 'messages'"


@dataclass
class Record:
    """One example: ``prompt`` (context, not scored) then ``completion`` (scored).

    Plain text has an empty prompt. A chat example keeps its ``messages``; it is rendered with the
    tokenizer's chat template in :func:`encode`, so records do not depend on a tokenizer.
    """

    completion: str = ""
    prompt: str = ""
    messages: list[dict[str, str]] | None = None
    route: int = NO_ROUTE  # the index of the teacher this record is distilled from (data.teacher_column)


@dataclass
class ReadResult:
    """Records read from files; ``skipped`` bad lines (``on_error="skip"``), ``empty`` blank documents."""

    records: list[Record]
    skipped: int = 0
    empty: int = 0
    problems: list[str] = field(default_factory=list)  # "file: line N: why", one per skipped line

    def summary(self) -> str:
        return f"{len(self.records)} records, {self.skipped} bad lines skipped, {self.empty} empty documents dropped"


class _BadRow(Exception):
    pass


def _record_from_row(row: Any) -> Record | None:
    """A record from a JSON object or table row; None for an empty document; _BadRow if malformed."""
    if not isinstance(row, dict):
        raise _BadRow(f"is a JSON {type(row).__name__}, not an object; {FIELDS_HINT}")
    if row.get("messages") is not None:
        messages = chat_messages(row["messages"], _BadRow)
        if messages[-1]["role"] != "assistant":
            raise _BadRow(f"last message has role {messages[-1]['role']!r}; it must be 'assistant' (the completion)")
        return Record(messages=messages)
    if row.get("prompt") is not None or row.get("completion") is not None:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _BadRow("'prompt' and 'completion' must both be strings")
        return Record(completion=completion, prompt=prompt) if completion.strip() else None
    if isinstance(row.get("text"), str):
        return Record(completion=row["text"]) if row["text"].strip() else None
    raise _BadRow(f"has no usable field; {FIELDS_HINT}")


def read_utf8(path: Path) -> str:
    """The text of ``path``; one line naming the file and the byte when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.object[error.start : error.start + 1]!r})"
        ) from None


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    rows = []
    # split("\n"), not splitlines(): a JSON string may hold U+2028 or other line separators
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not records
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((f"line {number}", _BadRow(f"is not valid JSON ({error.msg})")))
    return rows


def _table_rows(path: Path) -> list[tuple[str, Any]]:
    import datasets

    kind = path.suffix[1:]
    if kind == "parquet" and _parquet_rows(path) == 0:
        return []  # datasets fails on a table of no rows; it is an empty file ("no usable records")
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs the failure it then raises
    try:
        # A throwaway cache: local files are re-read each time, nothing is written to ~/.cache.
        with tempfile.TemporaryDirectory() as cache_dir:
            table = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir)
            rows = table.to_list()
    except Exception as error:  # datasets raises many types for unreadable files
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:  # the reader's own words
            cause = cause.__cause__ or cause.__context__
        detail = " ".join(str(cause).split())[:200] or type(cause).__name__
        raise UserError(f"{path} could not be read as {kind}: {detail}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()
    return [(f"row {number}", row) for number, row in enumerate(rows, start=1)]


def _parquet_rows(path: Path) -> int:
    """Rows in a parquet file's footer (read by pyarrow, which datasets reads parquet with)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(str(path)).num_rows
    except Exception as error:  # pyarrow.ArrowInvalid and OSError for files that are not parquet
        raise UserError(f"{path} could not be read as parquet: {' '.join(str(error).split())[:200]}") from None


def _files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix in SUPPORTED and p.is_file())
            if not found:
                raise UserError(f"data folder '{item}' has no {', '.join(SUPPORTED)} files")
            files.extend(found)
        elif not item.is_file():
            raise UserError(f"data file '{item}' does not exist")
        elif item.suffix not in SUPPORTED:
            raise UserError(f"data file '{item}' has suffix '{item.suffix}'; allowed: {', '.join(SUPPORTED)}")
        else:
            files.append(item)
    return files


def _route(row: Any, column: str, teachers: Sequence[str]) -> int | str:
    """The teacher index a row's ``column`` names (``NO_ROUTE`` when missing, null or empty), or why not."""
    value = row.get(column) if isinstance(row, dict) else None
    if value is None or value == "":
        return NO_ROUTE
    if isinstance(value, str) and value in teachers:
        return list(teachers).index(value)
    return f"'{column}' is {value!r}, which names no teacher (teachers: {', '.join(teachers)})"


def read_records(
    paths: str | Path | Sequence[str | Path],
    *,
    on_error: str = "raise",
    teacher_column: str | None = None,
    teachers: Sequence[str] = (),
) -> ReadResult:
    """Records from local files or folders, in order.

    A malformed line or row (not JSON, no usable field, bad messages) is a :class:`UserError`
    naming the file and line (``row`` for parquet/csv), or with ``on_error="skip"`` it is skipped
    and counted in ``ReadResult.skipped``. Whitespace-only documents are dropped and counted in
    ``empty``. No record left at the end is a :class:`UserError`.

    ``teacher_column``: each record's route, the index in ``teachers`` of the name that field holds
    (plain ``.txt`` documents have none). A value that names no teacher is a :class:`UserError`
    naming file and line whatever ``on_error`` says: the data and the config disagree.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"on_error {on_error!r} is not allowed; use one of {', '.join(ON_ERROR)}")
    result, bad = ReadResult(records=[]), BadLines(on_error)
    files = _files(paths)
    for path in files:
        if path.suffix == ".txt":
            rows: list[tuple[str, Any]] = [("file", {"text": path.read_text(encoding="utf-8", errors="replace")})]
        elif path.suffix == ".jsonl":
            rows = _jsonl_rows(path)
        else:
            rows = _table_rows(path)
        for where, row in rows:
            try:
                if isinstance(row, _BadRow):
                    raise row
                record = _record_from_row(row)
            except _BadRow as error:
                bad.add(f"{path}: {where} {error}")
                continue
            if record is not None and teacher_column is not None:
                route = _route(row, teacher_column, teachers)
                if isinstance(route, str):
                    raise UserError(f"{path}: {where} {route}")
                record.route = route
            if record is None:
                result.empty += 1
            else:
                result.records.append(record)
    result.skipped, result.problems = bad.skipped, bad.problems
    if not result.records:
        raise UserError(f"no usable records in {', '.join(map(str, files))}: {result.summary()}; {FIELDS_HINT}")
    return result


def split(records: list[Record], *, fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """``(train, held_out)``: a seeded random ``fraction`` of the records is held out.

    Deterministic for a given ``seed`` and record list; both parts keep the original order. For a
    held-out set in separate files, call :func:`read_records` on those files instead.
    """
    if not 0.0 < fraction < 1.0:
        raise UserError(f"held-out fraction {fraction} is not allowed; use a number between 0 and 1 (exclusive)")
    count = round(len(records) * fraction)
    if count == 0 or count == len(records):
        raise UserError(f"held-out fraction {fraction} of {len(records)} records leaves one side empty; change it")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, str]:
    """``(prompt, completion)`` strings of a conversation rendered with the tokenizer's chat template.

    The prompt is every message but the last, with the generation prompt (what the model sees at
    inference); the completion is the rest of the full rendering (the last assistant turn).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat records need a tokenizer with a chat_template; set one or use prompt/completion")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template does not render the conversation as prompt + last assistant turn")
    return prompt, full[len(prompt) :]


def encode(record: Record, tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one record, untruncated; labels are -100 on prompt tokens.

    Plain text and prompt/completion get the tokenizer's special tokens (e.g. BOS) at the start
    and EOS at the end (so the model learns to stop). Chat renderings carry their own special tokens.
    The prompt and completion are tokenized separately, as at inference.
    """
    if record.messages is not None:
        prompt, completion = render_chat(record.messages, tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(record.prompt, add_special_tokens=True)["input_ids"] if record.prompt else []
        completion_ids = tokenizer(record.completion, add_special_tokens=not record.prompt)["input_ids"]
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UserError("the tokenizer has no eos token; documents must end with one")
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids = completion_ids + [eos]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def tokenize(
    records: list[Record], tokenizer: Any, *, seq_len: int, pack: bool, routes: bool = False
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels``, each ``(N, seq_len)`` int64 (and ``route`` with
    ``routes``: each token's record's teacher index, ``NO_ROUTE`` on padding).

    ``labels`` are aligned with ``input_ids`` (like HF's ``labels`` argument): the caller does the
    causal shift (logits at t predict labels at t + 1). They are -100 on padding and prompt tokens.

    ``pack=True``: all records, each ending in EOS, are concatenated into one stream and cut into
    full rows; the last partial row is dropped, and attention spans document boundaries (as in
    nanoGPT). ``pack=False``: one record per row, truncated on the right to ``seq_len`` and padded
    on the right with the tokenizer's pad id (attention_mask 0). Rows with no scored token (a prompt
    longer than ``seq_len``) are dropped with one warning; no row left is a :class:`UserError`.
    """
    if seq_len < 2:
        raise UserError(f"seq_len {seq_len} is too short; use at least 2 (a token and the next one)")
    encoded = [encode(record, tokenizer) for record in records]
    if pack:
        ids = [token for token_ids, _ in encoded for token in token_ids]
        labels = [label for _, row_labels in encoded for label in row_labels]
        route = [r.route for r, (token_ids, _) in zip(records, encoded) for _ in token_ids]
        rows = len(ids) // seq_len
        if rows == 0:
            raise UserError(f"packing needs at least seq_len={seq_len} tokens but the data has {len(ids)}")
        input_ids = torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
        label_rows = torch.tensor(labels[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
        route_rows = torch.tensor(route[: rows * seq_len], dtype=torch.long).view(rows, seq_len)
        attention_mask = torch.ones_like(input_ids)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise UserError("the tokenizer has neither a pad nor an eos token to pad with")
        input_ids = torch.full((len(encoded), seq_len), pad, dtype=torch.long)
        label_rows = torch.full((len(encoded), seq_len), IGNORE_INDEX, dtype=torch.long)
        route_rows = torch.full((len(encoded), seq_len), NO_ROUTE, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), seq_len), dtype=torch.long)
        for row, (token_ids, row_labels) in enumerate(encoded):
            length = min(len(token_ids), seq_len)
            input_ids[row, :length] = torch.tensor(token_ids[:length])
            label_rows[row, :length] = torch.tensor(row_labels[:length])
            route_rows[row, :length] = records[row].route
            attention_mask[row, :length] = 1
    scored = (label_rows != IGNORE_INDEX).any(dim=1)  # (N,)
    if not scored.all():
        warnings.warn(f"dropped {int((~scored).sum())} of {len(scored)} rows with no completion token", stacklevel=2)
    if not scored.any():
        raise UserError(f"no row has a completion token within seq_len={seq_len}; shorten prompts or raise seq_len")
    out = {"input_ids": input_ids[scored], "attention_mask": attention_mask[scored], "labels": label_rows[scored]}
    if routes:
        out["route"] = route_rows[scored]
    return out


def check_seq_len(seq_len: int, model: nn.Module) -> None:
    """:class:`UserError` if ``seq_len`` exceeds the model's maximum positions (when the config has one)."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise UserError(
            f"seq_len {seq_len} is longer than the model's maximum of {limit} positions; use at most {limit}"
        )
