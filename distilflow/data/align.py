"""Cross-tokenizer alignment: which student tokens and which teacher tokens spell the same text.

Each row's text is tokenized once by each tokenizer (a fast tokenizer: it gives character offsets).
Offsets are turned into UTF-8 byte offsets, and the tokens of both sides are cut into *groups*:
runs of consecutive teacher tokens and consecutive student tokens that cover the same span of
text, closed wherever both tokenizers have a token boundary at the same place. A word split
``["def"]`` by one side and ``["d", "ef"]`` by the other is one 1:2 group; positions are never
matched by index. A group is the unit the cross-tokenizer losses (losses/uld.py) compare.

Where a boundary is: after token ``k`` when every earlier token ends at or before, and every later
token starts at or after, some place ``c`` (``max(end[:k+1]) <= c <= min(start[k+1:])``). Byte-level
tokens that split one character share that character's offsets, so there is no boundary between
them, unless the tokens' own bytes (data/vocab_map.py) add up to the character: then they get a
byte each (``"é"`` as ``[0xC3][0xA9]`` on both sides is two 1:1 groups). A boundary interval may be
wide where one side covers no text (whitespace it drops): two sides agree where their intervals meet.

Rows are lists of :class:`Segment` (or a plain string, or ``(prompt, completion)``). Each segment is
tokenized separately on each side, as data/text.py ``encode`` does for a prompt and a completion,
so a segment boundary (where scoring starts) is a boundary on both sides; a segment marked ``eos``
ends with each side's EOS, and the two EOS tokens form a 1:1 group. Tokens without text (a BOS the
tokenizer adds, offsets ``(0, 0)``) belong to no group. A group is kept only if it is scored, every
token of it fits within its side's ``seq_len`` (truncation may cut one side only), and a logit
predicts its first token (it is not at position 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from distilflow.data.vocab_map import require_fast, token_bytes
from distilflow.errors import UserError

NO_TEXT = -1  # byte offset of a token that spells no text (BOS, EOS, padding)


@dataclass(frozen=True)
class Segment:
    """A piece of a row: ``text``; whether its groups are ``scored``; whether ``eos`` follows it.

    ``student_ids`` (on-policy samples): the student's tokens of ``text`` as they were sampled,
    used instead of tokenizing ``text`` again (a sample need not be the tokenizer's own split);
    their bytes must spell ``text`` exactly. ``teacher_text``: what the teacher reads instead of
    ``text`` (its own chat template's markers); a segment whose two texts differ is in no group.
    ``special_tokens``: a row that starts with this segment gets the tokenizers' own special tokens
    (a BOS) when the aligner adds them (a chat rendering writes its own: False).
    """

    text: str
    scored: bool = True
    eos: bool = False
    student_ids: tuple[int, ...] | None = None
    teacher_text: str | None = None
    special_tokens: bool = True


Row = str | tuple[str, str] | Sequence[Segment]


def as_segments(row: Row, *, eos: bool = True) -> list[Segment]:
    """A plain string is one scored segment; ``(prompt, completion)`` an unscored and a scored one.
    Either ends with EOS when ``eos``. A sequence of segments is taken as it is."""
    if isinstance(row, str):
        return [Segment(row, scored=True, eos=eos)]
    if isinstance(row, tuple) and len(row) == 2 and all(isinstance(part, str) for part in row):
        return [Segment(row[0], scored=False), Segment(row[1], scored=True, eos=eos)]
    segments = list(row)
    if not all(isinstance(segment, Segment) for segment in segments):
        raise TypeError("a row is a string, a (prompt, completion) pair of strings, or a sequence of Segment")
    return segments


def char_to_byte(text: str) -> np.ndarray:
    """``(len(text) + 1,)`` int64: the UTF-8 byte offset of each character offset of ``text``."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def split_shared_spans(offsets: np.ndarray, widths: list[int | None]) -> np.ndarray:
    """Byte offsets ``(n, 2)`` where runs of tokens with one identical span (a character split into
    bytes) get a byte range each, when their own byte widths add up to the span; other runs stay."""
    same = (offsets[1:] == offsets[:-1]).all(axis=1)  # (n - 1,) token k + 1 repeats token k's span
    if not same.any():
        return offsets
    out = offsets.copy()
    starts = np.flatnonzero(np.concatenate([[True], ~same]))  # where each run of one span begins
    ends = np.append(starts[1:], len(offsets))
    for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
        run = widths[start:end]
        if None not in run and sum(run) == offsets[start, 1] - offsets[start, 0]:
            edges = offsets[start, 0] + np.concatenate([[0], np.cumsum(run)])
            out[start:end, 0], out[start:end, 1] = edges[:-1], edges[1:]
    return out


def boundaries(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token boundaries of one side's text tokens ``(n, 2)``: ``(after, low, high)``, each ``(k,)``.

    A boundary after token ``after[i]`` may sit anywhere in ``[low[i], high[i]]``; the last token's
    boundary is open to the right. Places where tokens overlap (a split character) have none.
    """
    n = len(offsets)
    ends_so_far = np.maximum.accumulate(offsets[:, 1])  # (n,)
    starts_from = np.minimum.accumulate(offsets[::-1, 0])[::-1]  # (n,)
    high = np.append(starts_from[1:], np.iinfo(np.int64).max)  # the first start after token k
    keep = ends_so_far <= high
    return np.arange(n)[keep], ends_so_far[keep], high[keep]


def match_groups(student_offsets: np.ndarray, teacher_offsets: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Groups of one segment: ``(student_first, student_last, teacher_first, teacher_last)``, indices
    into the two sides' text tokens ``(n, 2)`` / ``(m, 2)`` byte offsets, in order, each side non-empty.

    Walks both sides' boundaries and closes a group at the first boundary the two share. Tokens
    after the last shared boundary (text one side does not cover) belong to no group.
    """
    if len(student_offsets) == 0 or len(teacher_offsets) == 0:
        return []
    s_after, s_low, s_high = boundaries(student_offsets)
    t_after, t_low, t_high = boundaries(teacher_offsets)
    groups, i, j, s_first, t_first = [], 0, 0, 0, 0
    while i < len(s_after) and j < len(t_after):
        if s_high[i] < t_low[j]:
            i += 1
        elif t_high[j] < s_low[i]:
            j += 1
        else:
            groups.append((s_first, int(s_after[i]), t_first, int(t_after[j])))
            s_first, t_first = int(s_after[i]) + 1, int(t_after[j]) + 1
            i, j = i + 1, j + 1
    return groups


class _Side:
    """One tokenizer's facts for alignment, read once: its token bytes, EOS and pad ids."""

    def __init__(self, tokenizer: Any, role: str) -> None:
        require_fast(tokenizer, role)
        self.tokenizer, self.role = tokenizer, role
        self.spelling = token_bytes(tokenizer)
        self.widths = [None if b is None else len(b) for b in self.spelling]
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        if self.pad is None:
            raise UserError(f"the {role} tokenizer has neither a pad nor an eos token to pad rows with")

    def encode(self, text: str, add_special_tokens: bool) -> tuple[list[int], np.ndarray]:
        """Ids and byte offsets ``(n, 2)`` of ``text``; ``NO_TEXT`` rows for tokens without text."""
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        chars = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # fast tokenizers give them
        offsets = char_to_byte(text)[chars]  # (n, 2)
        has_text = chars[:, 1] > chars[:, 0]
        offsets[has_text] = split_shared_spans(offsets[has_text], [self.widths[i] for i in np.asarray(ids)[has_text]])
        offsets[~has_text] = NO_TEXT
        return ids, offsets

    def from_ids(self, text: str, ids: Sequence[int]) -> tuple[list[int], np.ndarray]:
        """Byte offsets ``(n, 2)`` of given ids (a sample), from their own bytes, which must spell ``text``."""
        parts = [self.spelling[i] if 0 <= i < len(self.spelling) else None for i in ids]
        if None in parts or b"".join(parts) != text.encode("utf-8"):
            raise UserError(f"the {self.role} ids of a segment do not spell its text; pass the text they decode to")
        edges = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)])
        return list(ids), np.stack([edges[:-1], edges[1:]], axis=1)


@dataclass
class AlignedSide:
    """One model's tokens of a batch and its half of the groups.

    ``input_ids`` / ``attention_mask`` ``(B, T)`` int64, right-padded; ``scored`` ``(B, T)`` bool,
    the tokens of scored segments (their EOS included: the student's CE labels); ``byte_offsets``
    ``(B, T, 2)`` int64 ``[start, end)`` in the row's UTF-8 text, ``NO_TEXT`` where a token has none
    (None in an alignment read back from a batch, data/aligned_rows.py); ``first`` / ``last`` ``(G,)``
    int64, the positions of each group's first and last token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    scored: torch.Tensor
    byte_offsets: torch.Tensor | None
    first: torch.Tensor
    last: torch.Tensor


@dataclass
class Alignment:
    """Groups of a batch: group ``g`` is row ``batch[g]``, student tokens ``student.first[g] ..
    student.last[g]`` and teacher tokens ``teacher.first[g] .. teacher.last[g]`` (inclusive).

    The logit predicting a group's first token is at position ``first - 1`` of that side's logits,
    shifted ``(B, T - 1, V)`` or not ``(B, T, V)``. ``texts`` the rows' texts (the student's; empty
    in an alignment read back from a batch).
    """

    student: AlignedSide
    teacher: AlignedSide
    batch: torch.Tensor
    texts: list[str]

    @property
    def num_groups(self) -> int:
        return int(self.batch.numel())

    def select(self, rows: Sequence[int] | torch.Tensor) -> Alignment:
        """The alignment of ``rows`` (distinct, in that order): a micro-batch of a data set aligned once.
        Rows keep this alignment's padded width."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.batch.device)
        new_row = torch.full((self.student.input_ids.shape[0],), -1, dtype=torch.long, device=rows.device)
        new_row[rows] = torch.arange(len(rows), device=rows.device)
        keep = new_row[self.batch] >= 0  # (G,) groups of the selected rows

        def pick(side: AlignedSide) -> AlignedSide:
            per_row = [side.input_ids, side.attention_mask, side.scored, side.byte_offsets]
            return AlignedSide(*(None if t is None else t[rows] for t in per_row), side.first[keep], side.last[keep])

        texts = [self.texts[int(r)] for r in rows] if self.texts else []
        return Alignment(pick(self.student), pick(self.teacher), new_row[self.batch[keep]], texts)

    def to(self, device: torch.device | str) -> Alignment:
        def move(side: AlignedSide) -> AlignedSide:
            values = {f.name: getattr(side, f.name) for f in fields(side)}
            return AlignedSide(**{name: None if v is None else v.to(device) for name, v in values.items()})

        return Alignment(move(self.student), move(self.teacher), self.batch.to(device), self.texts)


@dataclass
class _RowSide:
    ids: list[int]
    offsets: list[np.ndarray]
    scored: list[bool]


class Aligner:
    """Tokenizes rows on both sides and groups their tokens (module docstring); built once per run.

    ``student_seq_len`` / ``teacher_seq_len``: tokens kept per row on each side. ``add_special_tokens``
    applies to a row's first segment (a BOS where the tokenizer adds one), as in data/text.py.
    """

    def __init__(
        self,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *,
        student_seq_len: int,
        teacher_seq_len: int,
        add_special_tokens: bool = True,
    ) -> None:
        if student_seq_len < 2 or teacher_seq_len < 2:
            raise UserError(f"seq_len must be at least 2 on both sides; got {student_seq_len} and {teacher_seq_len}")
        self.student = _Side(student_tokenizer, "student")
        self.teacher = _Side(teacher_tokenizer, "teacher")
        self.student_seq_len, self.teacher_seq_len = student_seq_len, teacher_seq_len
        self.add_special_tokens = add_special_tokens

    def _segment(self, side: _Side, segment: Segment, first: bool, row: _RowSide, byte_start: int) -> list[int]:
        """Appends one segment's tokens (and EOS) to ``row``; returns the row positions of its text
        tokens, then of its EOS when it has one."""
        text = segment.text if side is self.student else _teacher_text(segment)
        if side is self.student and segment.student_ids is not None:
            ids, offsets = side.from_ids(text, segment.student_ids)
        else:
            ids, offsets = side.encode(text, self.add_special_tokens and first and segment.special_tokens)
        start = len(row.ids)
        has_text = offsets[:, 0] != NO_TEXT
        offsets = np.where(has_text[:, None], offsets + byte_start, NO_TEXT)
        row.ids.extend(ids)
        row.offsets.extend(offsets)
        row.scored.extend([segment.scored] * len(ids))
        positions = [start + int(k) for k in np.flatnonzero(has_text)]
        if segment.eos:
            if side.eos is None:
                raise UserError(f"the {side.role} tokenizer has no eos token; segments marked eos need one")
            # The tokenizer's own EOS (added after the text, no offsets) serves; else one is appended.
            if not (ids and ids[-1] == side.eos and not has_text[-1]):
                row.ids.append(side.eos)
                row.offsets.append(np.array([NO_TEXT, NO_TEXT]))
                row.scored.append(segment.scored)
            positions.append(len(row.ids) - 1)
        return positions

    def _row(self, segments: list[Segment]) -> tuple[_RowSide, _RowSide, list[tuple[int, int, int, int]], str]:
        student, teacher = _RowSide([], [], []), _RowSide([], [], [])
        groups, byte_start, teacher_start = [], 0, 0
        for index, segment in enumerate(segments):
            s_pos = self._segment(self.student, segment, index == 0, student, byte_start)
            t_pos = self._segment(self.teacher, segment, index == 0, teacher, teacher_start)
            s_eos, t_eos = (s_pos.pop(), t_pos.pop()) if segment.eos else (None, None)
            found = []
            if _teacher_text(segment) == segment.text:  # else the two sides read different text here
                s_offsets = np.asarray([student.offsets[p] for p in s_pos], dtype=np.int64).reshape(-1, 2)
                t_offsets = np.asarray([teacher.offsets[p] for p in t_pos], dtype=np.int64).reshape(-1, 2)
                t_offsets = t_offsets + (byte_start - teacher_start)  # the same text at the same place
                found = [(s_pos[a], s_pos[b], t_pos[c], t_pos[d]) for a, b, c, d in match_groups(s_offsets, t_offsets)]
            if segment.eos:
                found.append((s_eos, s_eos, t_eos, t_eos))  # both mean "the text ends here"
            if segment.scored:
                groups.extend(found)
            byte_start += len(segment.text.encode("utf-8"))
            teacher_start += len(_teacher_text(segment).encode("utf-8"))
        kept = [
            (s_first, s_last, t_first, t_last)
            for s_first, s_last, t_first, t_last in groups
            if s_first >= 1 and t_first >= 1 and s_last < self.student_seq_len and t_last < self.teacher_seq_len
        ]
        return student, teacher, kept, "".join(segment.text for segment in segments)

    def __call__(self, rows: Sequence[Row], *, eos: bool = True) -> Alignment:
        """The :class:`Alignment` of a batch of rows (see :func:`as_segments`; ``eos`` for plain rows)."""
        built = [self._row(as_segments(row, eos=eos)) for row in rows]
        if not built:
            raise ValueError("no rows to align")
        batch = [b for b, (_, _, groups, _) in enumerate(built) for _ in groups]
        groups = np.asarray([g for _, _, row_groups, _ in built for g in row_groups], dtype=np.int64).reshape(-1, 4)
        student = _pad([s for s, _, _, _ in built], self.student, self.student_seq_len, groups[:, 0], groups[:, 1])
        teacher = _pad([t for _, t, _, _ in built], self.teacher, self.teacher_seq_len, groups[:, 2], groups[:, 3])
        return Alignment(student, teacher, torch.tensor(batch, dtype=torch.long), [text for *_, text in built])


def _teacher_text(segment: Segment) -> str:
    return segment.text if segment.teacher_text is None else segment.teacher_text


def _pad(rows: list[_RowSide], side: _Side, seq_len: int, first: np.ndarray, last: np.ndarray) -> AlignedSide:
    """Rows cut at ``seq_len`` and right-padded to the longest kept row."""
    width = max(min(len(row.ids), seq_len) for row in rows)
    width = max(width, 1)
    input_ids = torch.full((len(rows), width), side.pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.bool)
    byte_offsets = torch.full((len(rows), width, 2), NO_TEXT, dtype=torch.long)
    for b, row in enumerate(rows):
        n = min(len(row.ids), seq_len)
        if n == 0:
            continue
        input_ids[b, :n] = torch.tensor(row.ids[:n])
        attention_mask[b, :n] = 1
        scored[b, :n] = torch.tensor(row.scored[:n])
        byte_offsets[b, :n] = torch.from_numpy(np.stack(row.offsets[:n]))
    return AlignedSide(
        input_ids, attention_mask, scored, byte_offsets, torch.from_numpy(first.copy()), torch.from_numpy(last.copy())
    )
