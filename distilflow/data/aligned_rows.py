"""Aligned rows as training data: records cut into rows of text segments, aligned once, stored as columns.

Cross-tokenizer distillation (docs/CROSS_TOKENIZER.md) trains on rows that both tokenizers read:

- :func:`packed_segments`: plain documents packed into rows, cut at a student token boundary where
  both sides still fit (``student_seq_len`` student tokens and ``teacher_seq_len`` teacher tokens,
  an EOS after each document end), so no aligned group is lost to one side's truncation;
- :func:`record_segments`: one record per row, its prompt unscored; a chat record is rendered with
  each side's own chat template, and only the last turn's content is compared.

:func:`alignment_to_rows` turns an :class:`~distilflow.data.align.Alignment` into per-token columns
``(N, T)``: the student's ``input_ids`` / ``attention_mask`` / ``labels`` (the usual causal-LM
columns: labels are the ids of scored tokens, -100 elsewhere), ``group`` (the index of the token's
group within its row, -1 for none) and ``chars`` (characters whose first byte the token spells: what
bits per character divides by), and the same five for the teacher prefixed ``teacher_``. Micro-batches,
torchrun shards and the teacher-signal cache then carry the alignment like any other column, and
:func:`alignment_from_rows` reads it back for the rows of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distilflow.data.align import NO_TEXT, AlignedSide, Alignment, Segment
from distilflow.data.text import Record, render_chat
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX

Batch = dict[str, torch.Tensor]
SIDE_KEYS = ("input_ids", "attention_mask", "labels", "group", "chars")
TEACHER_PREFIX = "teacher_"


def _side_columns(side: AlignedSide, batch: torch.Tensor, texts: list[bytes]) -> Batch:
    """The five columns of one side ``(N, T)`` (see the module docstring)."""
    rows, width = side.input_ids.shape
    counts = torch.bincount(batch, minlength=rows)  # (N,) groups per row
    starts = torch.cumsum(counts, 0) - counts  # (N,) the flat index of each row's first group
    local = torch.arange(len(batch)) - starts[batch]  # (G,) the group's index within its row
    lengths = side.last - side.first + 1  # (G,)
    owner = torch.repeat_interleave(torch.arange(len(batch)), lengths)  # (C,) the group of each grouped token
    within = torch.arange(len(owner)) - (torch.cumsum(lengths, 0) - lengths)[owner]
    group = torch.full((rows, width), -1, dtype=torch.long)
    group[batch[owner], side.first[owner] + within] = local[owner]
    chars = torch.zeros((rows, width), dtype=torch.long)
    offsets = side.byte_offsets.numpy()
    for b, text in enumerate(texts):
        lead = np.frombuffer(text, dtype=np.uint8) & 0xC0 != 0x80  # a character's first byte
        before = np.concatenate([[0], np.cumsum(lead)])  # (bytes + 1,) characters before each byte
        has_text = offsets[b, :, 0] != NO_TEXT
        spans = offsets[b, has_text]  # (n, 2), in order; spans may overlap (a marker, a split character)
        # A character belongs to the first token whose span holds its first byte: start where the earlier
        # tokens ended.
        reached = np.maximum.accumulate(np.concatenate([[0], spans[:-1, 1]])) if len(spans) else spans[:, 0]
        starts = np.minimum(np.maximum(spans[:, 0], reached), spans[:, 1])
        chars[b, torch.from_numpy(has_text)] = torch.from_numpy(before[spans[:, 1]] - before[starts])
    labels = torch.where(side.scored & side.attention_mask.bool(), side.input_ids, IGNORE_INDEX)
    return {
        "input_ids": side.input_ids,
        "attention_mask": side.attention_mask,
        "labels": labels,
        "group": group,
        "chars": chars,
    }


def alignment_to_rows(alignment: Alignment, teacher_texts: list[str] | None = None) -> Batch:
    """Columns ``(N, T_student)`` and ``teacher_*`` ``(N, T_teacher)`` of an alignment made by the
    Aligner (byte offsets and texts known). ``teacher_texts``: the rows as the teacher read them, when
    some segment had its own ``teacher_text`` (default: the student's texts)."""
    student_texts = [text.encode("utf-8") for text in alignment.texts]
    teacher_bytes = [text.encode("utf-8") for text in teacher_texts] if teacher_texts else student_texts
    rows = _side_columns(alignment.student, alignment.batch, student_texts)
    teacher = _side_columns(alignment.teacher, alignment.batch, teacher_bytes)
    rows.update({TEACHER_PREFIX + key: value for key, value in teacher.items()})
    return rows


def _side_of(batch: Batch, prefix: str, total: int) -> AlignedSide:
    """One side's first / last positions ``(G,)`` read back from its ``group`` column."""
    group = batch[prefix + "group"]  # (B, T)
    width = group.shape[1]
    grouped = group >= 0
    counts = (group.max(dim=1).values + 1).clamp(min=0)  # (B,)
    starts = torch.cumsum(counts, 0) - counts
    flat = (starts[:, None] + group)[grouped]  # (C,) each grouped token's flat group index
    positions = torch.arange(width, device=group.device).expand_as(group)[grouped]
    first = torch.full((total,), width, dtype=torch.long, device=group.device)
    last = torch.full((total,), -1, dtype=torch.long, device=group.device)
    first.scatter_reduce_(0, flat, positions, "amin")
    last.scatter_reduce_(0, flat, positions, "amax")
    labels = batch.get(prefix + "labels")  # a probe has none: every real token then counts as scored
    scored = labels != IGNORE_INDEX if labels is not None else batch[prefix + "attention_mask"].bool()
    return AlignedSide(batch[prefix + "input_ids"], batch[prefix + "attention_mask"], scored, None, first, last)


def alignment_from_rows(batch: Batch) -> Alignment:
    """The :class:`Alignment` of a batch's rows (columns of :func:`alignment_to_rows`), groups in row
    order; ``byte_offsets`` and ``texts`` are not kept in a batch."""
    counts = (batch["group"].max(dim=1).values + 1).clamp(min=0)  # (B,) groups per row
    rows_of_groups = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    total = int(counts.sum())
    student = _side_of(batch, "", total)
    teacher = _side_of(batch, TEACHER_PREFIX, total)
    return Alignment(student, teacher, rows_of_groups, [])


def teacher_view(rows: Batch) -> Batch:
    """The teacher's columns of aligned rows as a causal-LM batch (``input_ids``, ``labels``, ...)."""
    return {key: rows[TEACHER_PREFIX + key] for key in SIDE_KEYS}


def student_view(rows: Batch) -> Batch:
    """The student's columns of aligned rows (what an exported student reads and is scored on)."""
    return {key: rows[key] for key in SIDE_KEYS}


# ----------------------------------------------------------------------------------- rows of text


def _char_spans(tokenizer: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: the character ``(starts, ends)`` of its tokens ``(n,)`` each (no special tokens)."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for offsets in encoded["offset_mapping"]:
        array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        spans.append((array[:, 0], array[:, 1]))
    return spans


def _added_tokens(tokenizer: Any) -> int:
    """Tokens the tokenizer adds to a text of its own (a BOS), with ``add_special_tokens``."""
    return len(tokenizer("a", add_special_tokens=True)["input_ids"]) - len(
        tokenizer("a", add_special_tokens=False)["input_ids"]
    )


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def packed_segments(
    texts: Sequence[str],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    *,
    student_seq_len: int,
    teacher_seq_len: int,
    tries: int = 4,
) -> list[list[Segment]]:
    """Documents packed into rows of segments (a document end is a segment with ``eos``), each row
    holding at most ``student_seq_len`` student and ``teacher_seq_len`` teacher tokens as the aligner
    will tokenize it (a BOS, each segment on its own, an EOS per document end).

    A document that does not fit is cut after a student token, the last one at which both sides fit
    by the document's own tokenization; a piece tokenized apart may take a token or two more (a
    teacher token the cut splits, a marker before the piece's first word), so each piece is counted
    as it will be tokenized and the cut moves back (up to ``tries`` places) until it fits. The last
    row, when partial, is dropped (as data/text.py drops a packed stream's partial row) unless it is
    the only one.
    """
    texts = [text for text in texts if text]
    student_spans = _char_spans(student_tokenizer, texts)
    teacher_spans = _char_spans(teacher_tokenizer, texts)
    # A BOS the tokenizer adds at the start of a row takes a place on that side.
    student_room = student_seq_len - _added_tokens(student_tokenizer)
    teacher_room = teacher_seq_len - _added_tokens(teacher_tokenizer)
    rows: list[list[Segment]] = []
    row: list[Segment] = []
    used = [0, 0]  # student, teacher tokens of the row so far

    def fits(piece: str, eos: bool) -> tuple[int, int] | None:
        counts = (_count(student_tokenizer, piece) + eos, _count(teacher_tokenizer, piece) + eos)
        ok = used[0] + counts[0] <= student_room and used[1] + counts[1] <= teacher_room
        return counts if ok else None

    def place(piece: str, eos: bool, counts: tuple[int, int]) -> None:
        row.append(Segment(piece, eos=eos))
        used[0], used[1] = used[0] + counts[0], used[1] + counts[1]

    for text, (s_start, s_end), (t_start, t_end) in zip(texts, student_spans, teacher_spans):
        first_token, char = 0, 0  # what is left of this document starts at this student token, this character
        while True:
            t_first = int(np.searchsorted(t_end, char, side="right"))  # teacher tokens ending after char
            whole = (len(s_start) - first_token + 1, len(t_start) - t_first + 1)  # + EOS, by the document's split
            if used[0] + whole[0] <= student_room and used[1] + whole[1] <= teacher_room:
                counts = fits(text[char:], True)
                if counts is not None:
                    place(text[char:], True, counts)
                    break
            # Cut after student token k - 1 (its end is the cut): the largest k where both sides fit.
            last = min(len(s_end), first_token + student_room - used[0])
            cuts = s_end[first_token:last]  # (n,) candidate cut characters
            teacher_tokens = np.searchsorted(t_start, cuts, side="left") - t_first  # overlapping [char, cut)
            candidates = np.flatnonzero((teacher_tokens <= teacher_room - used[1]) & (cuts > char))[::-1][:tries]
            for index in candidates:
                cut_token = first_token + int(index) + 1
                cut = int(s_end[cut_token - 1])
                counts = fits(text[char:cut], False)
                if counts is not None:
                    place(text[char:cut], False, counts)
                    first_token, char = cut_token, cut
                    break
            else:
                if not row:  # an empty row cannot hold a piece of this document
                    raise UserError(
                        f"a row of {student_seq_len} student and {teacher_seq_len} teacher tokens cannot hold a "
                        "piece of a document; raise seq_len / teacher_seq_len"
                    )
            rows.append(row)
            row, used[0], used[1] = [], 0, 0
    if row and not rows:
        rows.append(row)
    return rows


def record_segments(record: Record, student_tokenizer: Any, teacher_tokenizer: Any) -> list[Segment]:
    """One record as a row: plain text a scored segment with EOS; prompt + completion an unscored and a
    scored segment (EOS after it); chat messages rendered by each side's chat template (below)."""
    if record.messages is None:
        if not record.prompt:
            return [Segment(record.completion, eos=True)]
        return [Segment(record.prompt, scored=False), Segment(record.completion, eos=True)]
    templated = [bool(getattr(tok, "chat_template", None)) for tok in (student_tokenizer, teacher_tokenizer)]
    if templated == [True, False] or templated == [False, True]:
        has, lacks = ("student", "teacher") if templated[0] else ("teacher", "student")
        raise UserError(
            f"chat records: the {has} tokenizer has a chat template and the {lacks} tokenizer has none; across "
            "tokenizers each side renders the conversation with its own template, so give both one (or use "
            "prompt/completion records)"
        )
    content = record.messages[-1]["content"]
    pieces = []
    for tokenizer, role in ((student_tokenizer, "student"), (teacher_tokenizer, "teacher")):
        prompt, completion = render_chat(record.messages, tokenizer)
        at = completion.find(content) if content else -1
        if at < 0:
            raise UserError(
                f"the {role} tokenizer's chat template does not write the last turn's content as given; "
                "cross-tokenizer distillation compares that text on both sides (use prompt/completion records)"
            )
        pieces.append((prompt + completion[:at], completion[at + len(content) :]))
    (student_head, student_tail), (teacher_head, teacher_tail) = pieces
    # The templates' markers differ per side: each reads its own, and only the content is compared.
    segments = [
        Segment(student_head, scored=False, teacher_text=teacher_head, special_tokens=False),
        Segment(content, scored=True),
    ]
    if student_tail or teacher_tail:
        segments.append(Segment(student_tail, scored=True, teacher_text=teacher_tail))
    return segments


def row_texts(rows: list[list[Segment]]) -> tuple[list[str], list[str]]:
    """Each row's text as the student reads it and as the teacher reads it."""
    student = ["".join(segment.text for segment in row) for row in rows]
    teacher = [
        "".join(segment.text if segment.teacher_text is None else segment.teacher_text for segment in row)
        for row in rows
    ]
    return student, teacher
