"""Cross-tokenizer alignment (data/align.py) and the vocabulary map (data/vocab_map.py).

Hand-built tokenizers give splits that are easy to state: a "regex" tokenizer cuts text into the
longest of a few given pieces at each place (else one character), a "bytes" tokenizer is
byte-level with no merges (every UTF-8 byte a token). Two tokenizers trained on stdlib text with
different algorithms and sizes (byte-level BPE 2,048 as the LM demo's, unigram 4,096 with byte
fallback) check the same properties on real code: every group's two sides decode to the same text.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from distilflow.data.align import NO_TEXT, Aligner, Segment, char_to_byte, match_groups
from distilflow.data.align_guard import check_teacher_ids, span_agreement
from distilflow.data.vocab_map import build_vocab_map, token_bytes
from distilflow.errors import UserError

SPECIALS = ("<s>", "</s>", "<pad>")
CHARS = sorted({chr(c) for c in range(32, 127)} | {"\n", "é", "😀", "日"})


def regex_tokenizer(pieces: list[str], *, bos: bool = True, eos: bool = False, drop_spaces: bool = False):
    """Text cut into the longest matching piece at each place, else one character; ids 0..2 are
    ``<s> </s> <pad>``. ``bos`` / ``eos``: the post-processor adds them (offsets (0, 0)).
    ``drop_spaces``: white space is dropped first (as WordPiece does), leaving gaps in the offsets."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *pieces, *CHARS]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    longest_first = "|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True))
    split = pre_tokenizers.Split(Regex(longest_first + r"|[\s\S]" if pieces else r"[\s\S]"), "isolated")
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), split]) if drop_spaces else split
    )
    template = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def bytes_tokenizer(*, bos: bool = True):
    """Byte-level, no merges: a character of n UTF-8 bytes is n tokens sharing its offsets."""
    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def spelled(alignment, student, teacher, row: int = 0) -> list[tuple[list[str], list[str]]]:
    """Each group of ``row`` as (student tokens, teacher tokens)."""
    out = []
    for g in torch.nonzero(alignment.batch == row)[:, 0].tolist():
        s = alignment.student.input_ids[row, alignment.student.first[g] : alignment.student.last[g] + 1]
        t = alignment.teacher.input_ids[row, alignment.teacher.first[g] : alignment.teacher.last[g] + 1]
        out.append((student.convert_ids_to_tokens(s.tolist()), teacher.convert_ids_to_tokens(t.tolist())))
    return out


def groups_of(student, teacher, rows, *, seq_len=(64, 64), eos=True, **options):
    aligner = Aligner(student, teacher, student_seq_len=seq_len[0], teacher_seq_len=seq_len[1], **options)
    alignment = aligner(rows, eos=eos)
    return alignment, [spelled(alignment, student, teacher, row) for row in range(len(rows))]


# ---------------------------------------------------------------- hand-made splits


def test_a_word_split_one_to_two_and_two_to_one():
    whole = regex_tokenizer(["define", " x"])
    parts = regex_tokenizer(["def", "ine", " x"])
    _, (groups,) = groups_of(parts, whole, ["define x"])
    assert groups == [(["def", "ine"], ["define"]), ([" x"], [" x"]), (["</s>"], ["</s>"])]
    _, (groups,) = groups_of(whole, parts, ["define x"])
    assert groups == [(["define"], ["def", "ine"]), ([" x"], [" x"]), (["</s>"], ["</s>"])]


def test_two_to_three_closes_only_where_both_sides_cut():
    _, (groups,) = groups_of(regex_tokenizer(["a", "bc", "de"]), regex_tokenizer(["ab", "cde"]), ["abcde!"], eos=False)
    assert groups == [(["a", "bc", "de"], ["ab", "cde"]), (["!"], ["!"])]


def test_unicode_bytes_of_one_character():
    chars, raw = regex_tokenizer([]), bytes_tokenizer()
    _, (groups,) = groups_of(chars, raw, ["é!😀"], eos=False)
    assert groups == [(["é"], ["Ã", "©"]), (["!"], ["!"]), (["😀"], ["ð", "Ł", "ĺ", "Ģ"])]
    # Byte-level on both sides: the bytes of a character are tokens of their own, aligned 1:1.
    alignment, (groups,) = groups_of(bytes_tokenizer(), raw, ["é😀"], eos=False)
    assert groups == [(["Ã"], ["Ã"]), (["©"], ["©"]), (["ð"], ["ð"]), (["Ł"], ["Ł"]), (["ĺ"], ["ĺ"]), (["Ģ"], ["Ģ"])]
    assert alignment.teacher.byte_offsets[0, 1:7].tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6]]
    assert char_to_byte("é😀a").tolist() == [0, 2, 6, 7]


def test_whitespace_tokens_and_a_side_that_drops_white_space():
    spaces = regex_tokenizer(["  "])
    words = regex_tokenizer([" b"])
    _, (groups,) = groups_of(spaces, words, ["a  b"], eos=False)
    assert groups == [(["a"], ["a"]), (["  ", "b"], [" ", " b"])]
    # No token covers the spaces on one side: the gap is where the other side's cuts may fall.
    _, (groups,) = groups_of(regex_tokenizer([], drop_spaces=True), words, ["a  b c"], eos=False)
    assert groups == [(["a"], ["a"]), (["b"], [" ", " b"]), (["c"], [" ", "c"])]


def test_special_tokens_have_no_text_and_eos_pairs_with_eos():
    # BOS on one side only; the other side's first token has no logit before it, so it is not scored.
    with_bos, without_bos = regex_tokenizer(["ab"]), regex_tokenizer(["ab"], bos=False)
    alignment, (groups,) = groups_of(without_bos, with_bos, ["ab c"])
    assert groups == [([" "], [" "]), (["c"], ["c"]), (["</s>"], ["</s>"])]
    assert alignment.teacher.byte_offsets[0, 0].tolist() == [NO_TEXT, NO_TEXT]
    # A tokenizer that adds EOS itself keeps one EOS, not two.
    own_eos = regex_tokenizer(["ab"], eos=True)
    alignment, (groups,) = groups_of(own_eos, with_bos, ["ab"])
    assert own_eos.convert_ids_to_tokens(alignment.student.input_ids[0].tolist()) == ["<s>", "ab", "</s>"]
    assert groups == [(["ab"], ["ab"]), (["</s>"], ["</s>"])]


def test_truncation_on_one_side_drops_the_groups_it_cuts():
    short, long = regex_tokenizer(["define", " x"]), regex_tokenizer(["def", "ine"])
    text = "define x define"
    # Teacher (long) ids: <s> def ine " " x " " def ine </s>; seq_len 7 cuts the last "define" in two.
    alignment, (groups,) = groups_of(short, long, [text], seq_len=(64, 7))
    assert groups == [(["define"], ["def", "ine"]), ([" x"], [" ", "x"]), ([" "], [" "])]
    assert alignment.teacher.input_ids.shape == (1, 7) and alignment.student.attention_mask.sum() == 6
    _, (groups,) = groups_of(short, long, [text], seq_len=(3, 64))
    assert groups == [(["define"], ["def", "ine"]), ([" x"], [" ", "x"])]


def test_prompt_is_not_scored_and_its_end_is_a_cut_on_both_sides():
    # "x A" is one piece of the teacher's: tokenized in one go it would straddle the prompt's end.
    teacher, student = regex_tokenizer(["x A", "Q:"]), regex_tokenizer(["Q: x"])
    alignment, (groups,) = groups_of(student, teacher, [("Q: x", " A: y")])
    assert groups == [
        ([" "], [" "]),
        (["A"], ["A"]),
        ([":"], [":"]),
        ([" "], [" "]),
        (["y"], ["y"]),
        (["</s>"], ["</s>"]),
    ]
    assert student.convert_ids_to_tokens(alignment.student.input_ids[0].tolist())[:3] == ["<s>", "Q: x", " "]
    assert alignment.student.scored[0].tolist() == [False, False, True, True, True, True, True, True]
    # Segments: a document that is not scored, then one that is, each ending in EOS (packed rows).
    alignment, (groups,) = groups_of(
        student, teacher, [[Segment("ab", scored=False, eos=True), Segment("c", eos=True)]]
    )
    assert groups == [(["c"], ["c"]), (["</s>"], ["</s>"])]


def test_given_student_ids_are_used_as_sampled():
    teacher, student = regex_tokenizer(["define"]), regex_tokenizer(["def", "ine"])
    canonical = student("define x", add_special_tokens=False)["input_ids"]
    by_text, _ = groups_of(student, teacher, [[Segment("<s>", scored=False), Segment("define x")]], eos=False)
    sampled = [Segment("<s>", scored=False), Segment("define x", student_ids=tuple(canonical))]
    by_ids, _ = groups_of(student, teacher, [sampled], eos=False)
    assert torch.equal(by_ids.student.input_ids, by_text.student.input_ids)
    assert torch.equal(by_ids.student.first, by_text.student.first) and torch.equal(by_ids.batch, by_text.batch)
    # Not the tokenizer's own split ("d" "e" "f" "ine" for "define"): still aligned by text.
    odd = [student.convert_tokens_to_ids(t) for t in ["d", "e", "f", "ine", " ", "x"]]
    alignment = Aligner(student, teacher, student_seq_len=16, teacher_seq_len=16)(
        [[Segment("ab", scored=False), Segment("define x", student_ids=tuple(odd))]], eos=False
    )
    assert spelled(alignment, student, teacher) == [
        (["d", "e", "f", "ine"], ["define"]),
        ([" "], [" "]),
        (["x"], ["x"]),
    ]
    with pytest.raises(UserError, match="do not spell"):
        Aligner(student, teacher, student_seq_len=16, teacher_seq_len=16)([[Segment("define", student_ids=(5, 6))]])


def test_selecting_rows_of_an_alignment_is_aligning_them_alone():
    student, teacher = regex_tokenizer(["def", "ine", " x"]), regex_tokenizer(["define", " x", "ab"])
    rows = ["define x", "ab c", ("Q:", " define"), "x"]
    whole, groups = groups_of(student, teacher, rows)
    part = whole.select([2, 0])
    alone, alone_groups = groups_of(student, teacher, [rows[2], rows[0]])
    assert [spelled(part, student, teacher, row) for row in range(2)] == alone_groups == [groups[2], groups[0]]
    width = alone.teacher.input_ids.shape[1]
    assert torch.equal(part.teacher.input_ids[:, :width], alone.teacher.input_ids)
    assert torch.equal(part.student.scored[:, : alone.student.scored.shape[1]], alone.student.scored)
    assert part.texts == ["Q: define", "define x"] and part.num_groups == alone.num_groups


def test_match_groups_on_offsets_alone():
    # Overlapping offsets (a split character) have no cut inside; the uncovered tail is in no group.
    student = np.array([[0, 2], [2, 3], [2, 3], [3, 5], [5, 9]])
    teacher = np.array([[0, 1], [1, 3], [3, 4], [4, 5]])
    assert match_groups(student, teacher) == [(0, 2, 0, 1), (3, 3, 2, 3)]
    assert match_groups(student[:0], teacher) == []
    # A token inside an earlier, longer one: no cut until the longer one has ended.
    assert match_groups(np.array([[0, 3], [1, 2], [3, 4]]), np.array([[0, 2], [2, 3], [3, 4]])) == [
        (0, 1, 0, 1),
        (2, 2, 2, 2),
    ]


def test_a_slow_tokenizer_is_refused_in_one_line():
    fast = regex_tokenizer([])
    with pytest.raises(UserError) as caught:
        Aligner(fast, ByT5Tokenizer(), student_seq_len=8, teacher_seq_len=8)
    message = str(caught.value)
    assert "\n" not in message and "teacher tokenizer (ByT5Tokenizer)" in message and "fast tokenizer" in message
    with pytest.raises(UserError, match="student tokenizer"):
        build_vocab_map(ByT5Tokenizer(), fast)


# ---------------------------------------------------------------- real tokenizers trained on stdlib text


def held_out_rows(texts: list[str], size: int = 600, count: int = 24) -> list[str]:
    joined = "\n".join(texts)
    return [joined[i * size : (i + 1) * size] for i in range(count)]


def group_bytes(side, row: int, first, last) -> slice:
    """The bytes of the row's text that a group's tokens on one side cover, first to last."""
    offsets = side.byte_offsets[row, int(first) : int(last) + 1]
    return slice(int(offsets[:, 0].min()), int(offsets[:, 1].max()))


def test_trained_tokenizers_align_spans_of_identical_text(stdlib_pair):
    student, teacher, texts = stdlib_pair
    rows = held_out_rows(texts) + ["naïve café — 日本語 😀\tend"]
    alignment = Aligner(student, teacher, student_seq_len=1024, teacher_seq_len=1024)(rows)
    assert span_agreement(alignment, student, teacher, max_groups=10_000) == 1.0
    student_sizes = (alignment.student.last - alignment.student.first + 1).tolist()
    teacher_sizes = (alignment.teacher.last - alignment.teacher.first + 1).tolist()
    sizes = Counter(zip(student_sizes, teacher_sizes))
    assert sizes[(1, 1)] > alignment.num_groups / 3
    assert sizes[(1, 2)] and sizes[(2, 1)] and sizes[(2, 3)] + sizes[(3, 2)]  # every kind of split occurs
    for row, text in enumerate(rows):
        mine = alignment.batch == row
        s_first, s_last = alignment.student.first[mine], alignment.student.last[mine]
        t_first, t_last = alignment.teacher.first[mine], alignment.teacher.last[mine]
        assert (s_first[1:] > s_last[:-1]).all() and (t_first[1:] > t_last[:-1]).all()  # in order, disjoint
        # Each group covers the same bytes on both sides, but for white space one side leaves out.
        encoded = text.encode("utf-8")
        for g in range(int(mine.sum()) - 1):  # the last group is EOS
            s_text = encoded[group_bytes(alignment.student, row, s_first[g], s_last[g])]
            t_text = encoded[group_bytes(alignment.teacher, row, t_first[g], t_last[g])]
            assert s_text.strip() == t_text.strip(), (row, g)
        # Nearly all text is in some group: only the first (unpredicted) group and white space are not.
        spans = [group_bytes(alignment.student, row, first, last) for first, last in zip(s_first[:-1], s_last[:-1])]
        covered = sum(span.stop - span.start for span in spans)
        assert covered >= 0.9 * len(encoded)


def test_a_teacher_fed_the_student_ids_is_caught(stdlib_pair):
    student, teacher, texts = stdlib_pair
    alignment = Aligner(student, teacher, student_seq_len=256, teacher_seq_len=256)(held_out_rows(texts, count=4))
    check_teacher_ids(alignment, student, teacher, alignment.teacher.input_ids)  # its own ids pass
    fed_student_ids = alignment.student.input_ids.clamp(max=len(teacher) - 1)
    assert span_agreement(alignment, student, teacher, teacher_input_ids=fed_student_ids) < 0.1
    with pytest.raises(UserError, match="teacher's input ids do not spell"):
        check_teacher_ids(alignment, student, teacher, fed_student_ids)
    random_ids = torch.randint(
        0, len(teacher), alignment.teacher.input_ids.shape, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(UserError):
        check_teacher_ids(alignment, student, teacher, random_ids)


def test_vocab_map_pairs_tokens_of_equal_text_across_spellings(stdlib_pair):
    student, teacher, _ = stdlib_pair
    vocab_map = build_vocab_map(student, teacher)
    pairs = dict(zip(vocab_map.teacher_ids.tolist(), vocab_map.student_ids.tolist()))
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    # " return" is one token on both sides, spelled "Ġreturn" and "▁return".
    anchor = len(student("x", add_special_tokens=False)["input_ids"])  # "▁" "x": Metaspace marks the start
    for text in (" return", " self", "\n", "(", "def"):
        (t_id,) = teacher(text, add_special_tokens=False)["input_ids"]
        s_ids = student("x" + text, add_special_tokens=False)["input_ids"][anchor:]
        assert len(s_ids) == 1 and pairs[t_id] == s_ids[0], text
    assert pairs[teacher.eos_token_id] == student.eos_token_id
    # Every pair decodes to the same text (after a shared anchor: a lone "▁x" decodes without its space).
    anchor_t, anchor_s = teacher.convert_tokens_to_ids("x"), student.convert_tokens_to_ids("x")
    checked, texts = 0, token_bytes(teacher)
    for t_id, s_id in list(pairs.items())[:: max(1, len(pairs) // 200)]:
        whole_characters = "\ufffd" not in teacher.decode([t_id])
        if texts[t_id] is not None and whole_characters:  # not a special token, not part of a character
            assert teacher.decode([anchor_t, t_id]) == student.decode([anchor_s, s_id]), (t_id, s_id)
            checked += 1
    assert checked > 100
    assert 0.2 * len(teacher) < len(pairs) < len(teacher)
    assert token_bytes(student)[student.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert student.convert_tokens_to_ids("<0x0A>") not in pairs.values()  # the "\n" piece has it


def test_unigram_tokenizer_round_trips_any_text_without_unknown_tokens(stdlib_pair):
    student, _, texts = stdlib_pair
    assert len(student) == 4096
    assert [student.unk_token_id, student.bos_token_id, student.eos_token_id, student.pad_token_id] == [0, 1, 2, 3]
    for text in [texts[0][:2000], "naïve café — 日本語 😀\tend\r\n", "x = {'a': 1}\n\n\n    return  x  "]:
        ids = student(text, add_special_tokens=False)["input_ids"]
        assert student.unk_token_id not in ids and student.decode(ids) == text
    # Indentation is one token (a run of white space), not one per space.
    tokens = student.convert_ids_to_tokens(student("x\n        return x", add_special_tokens=False)["input_ids"])
    assert tokens[tokens.index("\n") + 1 :][:2] == ["▁▁▁▁▁▁▁", "▁return"]


def test_a_llama2_style_tokenizer_spelled_by_its_normaliser_aligns_too(stdlib_pair):
    """Llama 2's tokenizer.json has no pre-tokenizer: a normaliser writes spaces as "▁" and the decoder
    is Replace("▁", " ") + ByteFallback + Fuse + Strip. Its pieces here: the unigram student's."""
    from tokenizers import normalizers

    student, teacher, texts = stdlib_pair
    vocab = [tuple(entry) for entry in json.loads(student.backend_tokenizer.to_str())["model"]["vocab"]]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    llama2 = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    spelled_as = token_bytes(llama2)
    assert spelled_as[llama2.convert_tokens_to_ids("▁return")] == b" return"
    assert spelled_as[llama2.convert_tokens_to_ids("<0x0A>")] == b"\n"
    rows = held_out_rows(texts, count=8) + ["naïve café — 日本語 😀\tend"]
    alignment = Aligner(llama2, teacher, student_seq_len=1024, teacher_seq_len=1024)(rows)
    assert alignment.num_groups > 1000 and span_agreement(alignment, llama2, teacher, max_groups=10_000) == 1.0
    assert len(build_vocab_map(llama2, teacher)) > 0.3 * len(teacher)
