from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from distilflow.data.text import Record, check_seq_len, read_records, render_chat, split, tokenize
from distilflow.errors import UserError
from distilflow.models.hf import build_causal_lm

from .conftest import family_config

M = -100  # IGNORE_INDEX, spelled out for hand-written expectations
WORDS = ["<eos>", "<pad>", "<unk>", "a", "b", "c", "d", "user", "assistant"]
EOS, PAD, A, B, C, D, USER, ASSISTANT = 0, 1, 3, 4, 5, 6, 7, 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@pytest.fixture(scope="module")
def words():
    """A word-level tokenizer with known ids, so every expected tensor is written by hand."""
    model = models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_completion_padding_and_masks(words):
    records = [Record(prompt="a b", completion="c d"), Record(completion="d")]
    batch = tokenize(records, words, seq_len=7, pack=False)
    assert batch["input_ids"].tolist() == [[A, B, C, D, EOS, PAD, PAD], [D, EOS, PAD, PAD, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[M, M, C, D, EOS, M, M], [D, EOS, M, M, M, M, M]]
    assert {v.dtype for v in batch.values()} == {torch.int64}


def test_truncation_and_rows_without_completion(words):
    batch = tokenize([Record(prompt="a b", completion="c d")], words, seq_len=3, pack=False)
    assert batch["input_ids"].tolist() == [[A, B, C]] and batch["labels"].tolist() == [[M, M, C]]
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows with no completion token"):
        batch = tokenize([Record(prompt="a b c", completion="d"), Record(completion="a")], words, seq_len=3, pack=False)
    assert batch["input_ids"].tolist() == [[A, EOS, PAD]]
    with pytest.raises(UserError, match="no row has a completion token within seq_len=2"), pytest.warns(UserWarning):
        tokenize([Record(prompt="a b", completion="c")], words, seq_len=2, pack=False)


def test_packing_makes_full_rows(words):
    records = [Record(completion="a b c"), Record(completion="d"), Record(prompt="a", completion="b"), Record("c")]
    # stream: a b c <eos> d <eos> | a(prompt) b <eos> c <eos> -> 11 tokens, 3 rows of 3, 2 dropped
    batch = tokenize(records, words, seq_len=3, pack=True)
    assert batch["input_ids"].tolist() == [[A, B, C], [EOS, D, EOS], [A, B, EOS]]
    assert batch["labels"].tolist() == [[A, B, C], [EOS, D, EOS], [M, B, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1]] * 3
    with pytest.raises(UserError, match="packing needs at least seq_len=8 tokens but the data has 2"):
        tokenize([Record(completion="a")], words, seq_len=8, pack=True)


def test_chat_template_masks_everything_but_last_assistant_turn(words):
    messages = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]
    assert render_chat(messages, words) == ("user a b <eos> assistant ", "c <eos> ")
    batch = tokenize([Record(messages=messages)], words, seq_len=8, pack=False)
    assert batch["input_ids"].tolist() == [[USER, A, B, EOS, ASSISTANT, C, EOS, PAD]]
    assert batch["labels"].tolist() == [[M, M, M, M, M, C, EOS, M]]


def test_jsonl_formats_and_chat(tmp_path, words):
    lines = [
        json.dumps({"text": "a b"}),
        json.dumps({"prompt": "a", "completion": "b"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "d"}, {"role": "assistant", "content": "c"}]}),
        json.dumps({"text": "   "}),
    ]
    result = read_records(write_lines(tmp_path / "mixed.jsonl", lines))
    assert result.records[:2] == [Record(completion="a b"), Record(prompt="a", completion="b")]
    assert result.records[2].messages[-1] == {"role": "assistant", "content": "c"}
    assert (len(result.records), result.skipped, result.empty) == (3, 0, 1)
    labels = tokenize(result.records, words, seq_len=6, pack=False)["labels"]
    assert labels.tolist()[2] == [M, M, M, M, C, EOS]  # user d <eos> assistant | c <eos>


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"text": "a"}), "{not json", json.dumps({"txt": "b"})])
    with pytest.raises(UserError, match=r"bad\.jsonl: line 2 is not valid JSON") as info:
        read_records(path)
    assert str(path) in str(info.value)
    result = read_records(path, on_error="skip")
    assert (len(result.records), result.skipped) == (1, 2)
    assert result.problems[1] == f"{path}: line 3 has no usable field; expected 'text', or 'prompt' and " + (
        "'completion', or 'messages'"
    )
    chat = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user", "content": "a"}]})])
    with pytest.raises(UserError, match="chat.jsonl: line 1 last message has role 'user'; it must be 'assistant'"):
        read_records(chat)
    with pytest.raises(UserError, match="on_error 'ignore' is not allowed"):
        read_records(path, on_error="ignore")


def test_parquet_and_csv_through_datasets(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", "d"]}), tmp_path / "pc.parquet")
    (tmp_path / "texts.csv").write_text("text,source\nhello world,x\n,y\n")
    parquet = read_records(tmp_path / "pc.parquet").records
    assert parquet == [Record(prompt="a", completion="c"), Record(prompt="b", completion="d")]
    with pytest.raises(UserError, match=r"texts\.csv: row 2 has no usable field"):
        read_records(tmp_path / "texts.csv")
    result = read_records([tmp_path / "texts.csv", tmp_path / "pc.parquet"], on_error="skip")
    assert [r.completion for r in result.records] == ["hello world", "c", "d"] and result.skipped == 1


def test_txt_files_and_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second\n\nstill second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "notes.md").write_text("ignored")
    records = read_records(tmp_path / "docs").records
    assert [r.completion for r in records] == ["first", "second\n\nstill second"]  # sorted, one per file
    with pytest.raises(UserError, match="has suffix '.md'; allowed: .txt, .jsonl, .parquet, .csv"):
        read_records(tmp_path / "docs" / "notes.md")
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(UserError, match="no usable records in .*empty.txt: 0 records, 0 bad lines skipped, 1 empty"):
        read_records(tmp_path / "empty.txt")
    path = write_lines(tmp_path / "allbad.jsonl", ["[1, 2]", "nope"])
    with pytest.raises(UserError, match="no usable records .* 2 bad lines skipped"):
        read_records(path, on_error="skip")


def test_split_is_deterministic_and_disjoint():
    records = [Record(completion=str(i)) for i in range(20)]
    train, held = split(records, fraction=0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert split(records, fraction=0.25, seed=3) == (train, held)
    assert sorted(r.completion for r in train + held) == sorted(r.completion for r in records)
    assert [int(r.completion) for r in held] == sorted(int(r.completion) for r in held)  # original order kept
    assert split(records, fraction=0.25, seed=4)[1] != held
    with pytest.raises(UserError, match="held-out fraction 1.5 is not allowed"):
        split(records, fraction=1.5, seed=0)
    with pytest.raises(UserError, match="leaves one side empty"):
        split(records[:3], fraction=0.1, seed=0)


def test_check_seq_len(tokenizer):
    model = build_causal_lm(family_config("gpt2", len(tokenizer)))  # n_positions 48
    check_seq_len(48, model)
    with pytest.raises(UserError, match="seq_len 49 is longer than the model's maximum of 48 positions"):
        check_seq_len(49, model)
