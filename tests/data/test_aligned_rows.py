"""Aligned rows as training data (data/aligned_rows.py): columns round-trip, packing, chat records, the guard.

The tokenizers are the stdlib pair of tests/data/conftest.py (unigram 4,096 for the student, byte-level
BPE 2,048 for the teacher); references are the Aligner's own groups, Python's character counts and
the documents' text.
"""

from __future__ import annotations

import copy

import pytest
import torch

from distilflow.data.align import Aligner, Segment
from distilflow.data.aligned_rows import (
    alignment_from_rows,
    alignment_to_rows,
    packed_segments,
    record_segments,
    row_texts,
)
from distilflow.data.text import Record
from distilflow.errors import UserError
from distilflow.tasks.cross_tokenizer import spelled_prefix
from distilflow.teachers.cross_tokenizer import TeacherIdsGuard

BIG = 100_000  # a seq_len that cuts nothing


def rows_of(texts: list[str], size: int = 500, count: int = 12) -> list[str]:
    joined = "\n".join(texts)
    return [joined[i * size : (i + 1) * size] for i in range(count)]


def test_columns_round_trip_to_the_aligners_groups(stdlib_pair):
    student, teacher, texts = stdlib_pair
    rows = rows_of(texts) + ["naïve café — 日本語 😀\tend"]
    alignment = Aligner(student, teacher, student_seq_len=96, teacher_seq_len=90)(rows)
    columns = alignment_to_rows(alignment)
    back = alignment_from_rows(columns)
    assert torch.equal(back.batch, alignment.batch)
    for side, original in ((back.student, alignment.student), (back.teacher, alignment.teacher)):
        assert torch.equal(side.first, original.first) and torch.equal(side.last, original.last)
        assert torch.equal(side.input_ids, original.input_ids)
    # A micro-batch's rows read back alone are the same groups as selecting them from the whole.
    picked = {key: value[[0, 3]] for key, value in columns.items()}
    alone, selected = alignment_from_rows(picked), alignment.select([0, 3])
    assert torch.equal(alone.batch, selected.batch) and torch.equal(alone.teacher.last, selected.teacher.last)


def test_each_character_is_counted_once_on_each_side(stdlib_pair):
    """Bits per character divide by the characters the tokens spell: with nothing cut, each row's
    tokens spell all of its characters once (a character split into byte tokens counts once)."""
    student, teacher, texts = stdlib_pair
    rows = rows_of(texts, size=300, count=6) + ["naïve café — 日本語 😀\tend", "é"]
    columns = alignment_to_rows(Aligner(student, teacher, student_seq_len=BIG, teacher_seq_len=BIG)(rows))
    for prefix in ("", "teacher_"):
        assert columns[prefix + "chars"].sum(dim=1).tolist() == [len(row) for row in rows]
    # The teacher's byte-level "é" is two tokens: one counts the character, the other nothing.
    last = columns["teacher_chars"][-1]
    assert sorted(last[last.nonzero()].flatten().tolist()) == [1]


def test_packed_rows_fit_both_sides_and_keep_the_text_in_order(stdlib_pair):
    student, teacher, texts = stdlib_pair
    joined = "\n".join(texts)
    docs = [joined[i * 700 : i * 700 + 100 + 50 * i] for i in range(12)]  # documents of 100 to 650 characters
    rows = packed_segments(docs, student, teacher, student_seq_len=64, teacher_seq_len=64)
    joined = "".join(row_texts(rows)[0])
    assert "".join(docs).startswith(joined) and len(joined) > 0.9 * len("".join(docs))  # the partial row dropped
    assert sum(segment.eos for row in rows for segment in row) >= len(docs) - 1  # each document ends with EOS
    limited = Aligner(student, teacher, student_seq_len=64, teacher_seq_len=64)(rows)
    whole = Aligner(student, teacher, student_seq_len=BIG, teacher_seq_len=BIG)(rows)
    # No group is lost to either side's seq_len: the rows were cut where both fit.
    assert torch.equal(torch.bincount(limited.batch), torch.bincount(whole.batch))
    filled = limited.student.attention_mask.sum(dim=1).float()
    assert filled.max() <= 64 and filled.mean() > 0.85 * 64


def test_chat_records_are_rendered_by_each_sides_template(stdlib_pair):
    student, teacher, _ = stdlib_pair
    student, teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    student.chat_template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    teacher.chat_template = "{% for m in messages %}[{{ m.role | upper }}]: {{ m.content }}\n{% endfor %}"
    record = Record(messages=[{"role": "user", "content": "sum two"}, {"role": "assistant", "content": "a + b"}])
    segments = record_segments(record, student, teacher)
    assert [s.text for s in segments] == ["<|user|>\nsum two<|end|>\n<|assistant|>\n", "a + b", "<|end|>\n"]
    assert [s.teacher_text for s in segments] == ["[USER]: sum two\n[ASSISTANT]: ", None, "\n"]
    assert [s.scored for s in segments] == [False, True, True]
    alignment = Aligner(student, teacher, student_seq_len=BIG, teacher_seq_len=BIG)([segments])
    student_text, teacher_text = (t[0].encode() for t in row_texts([segments]))
    content = (student_text.index(b"a + b"), student_text.index(b"a + b") + 5)
    for g in range(alignment.num_groups):  # groups lie in the content only (the markers differ)
        offsets = alignment.student.byte_offsets[0, alignment.student.first[g] : alignment.student.last[g] + 1]
        assert content[0] <= int(offsets[:, 0].min()) and int(offsets[:, 1].max()) <= content[1]
    assert alignment.num_groups >= 2
    # The teacher reads its own rendering.
    assert teacher.decode(alignment.teacher.input_ids[0][alignment.teacher.attention_mask[0].bool()]).replace(
        " ", ""
    ) == teacher_text.decode().replace(" ", "")
    teacher.chat_template = None
    with pytest.raises(UserError, match="the student tokenizer has a chat template and the teacher tokenizer has none"):
        record_segments(record, student, teacher)


def test_a_sample_is_cut_at_its_last_whole_character(stdlib_pair):
    _, teacher, _ = stdlib_pair
    spelling = Aligner(teacher, teacher, student_seq_len=8, teacher_seq_len=8).student.spelling
    ids = teacher("a é", add_special_tokens=False)["input_ids"]
    bytes_of = [spelling[i] for i in ids]
    assert b"".join(bytes_of) == "a é".encode()
    split = [i for i, b in enumerate(bytes_of) if b == b"\xa9"]  # byte-level "é" is ...0xC3 0xA9
    text, kept = spelled_prefix(spelling, ids[: split[0]] if split else ids[:-1])
    assert text == "a " and b"".join(spelling[i] for i in kept) == b"a "
    eos = teacher.eos_token_id
    assert spelled_prefix(spelling, [*ids, eos, *ids]) == ("a é", ids)  # stops at a token without text


def test_the_guard_refuses_the_student_ids_fed_to_the_teacher(stdlib_pair):
    student, teacher, texts = stdlib_pair
    rows = [[Segment(text, eos=True)] for text in rows_of(texts, count=4)]
    columns = alignment_to_rows(Aligner(student, teacher, student_seq_len=128, teacher_seq_len=128)(rows))
    TeacherIdsGuard(student, teacher)(columns, columns["teacher_input_ids"])  # its own ids pass
    wrong = columns["input_ids"][:, : columns["teacher_input_ids"].shape[1]] % len(teacher)
    with pytest.raises(UserError, match="the teacher's input ids do not spell the student's text"):
        TeacherIdsGuard(student, teacher)(columns, wrong)


def test_the_guard_checks_the_first_batch_of_samples_too(stdlib_pair):
    """On-policy samples are re-tokenized text: a batch of them is checked even after the data passed."""
    student, teacher, texts = stdlib_pair
    rows = [[Segment(text, eos=True)] for text in rows_of(texts, count=4)]
    columns = alignment_to_rows(Aligner(student, teacher, student_seq_len=128, teacher_seq_len=128)(rows))
    guard = TeacherIdsGuard(student, teacher)
    guard(columns, columns["teacher_input_ids"])
    wrong = columns["input_ids"][:, : columns["teacher_input_ids"].shape[1]] % len(teacher)
    guard(columns, wrong)  # a second batch of the data is not decoded again
    sampled = {**columns, "sampled": torch.ones(4, dtype=torch.bool)}
    with pytest.raises(UserError, match="the teacher's input ids do not spell the student's text"):
        guard(sampled, wrong)
