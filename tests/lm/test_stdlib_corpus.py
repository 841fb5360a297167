from __future__ import annotations

import torch
from transformers import AutoTokenizer

from distilflow.data.stdlib_corpus import (
    HELD_OUT_MODULES,
    load_stdlib_corpus,
    stdlib_files,
    stdlib_root,
    tiny_llama_config,
)
from distilflow.data.text import Record, tokenize
from distilflow.models.hf import build_causal_lm, load_causal_lm


def test_stdlib_files_skip_tests_and_are_sorted():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 300
    assert all(f.endswith(".py") for f in files)
    assert not [f for f in files if {"test", "tests", "site-packages"} & set(f.split("/")[:-1])]
    assert "json/decoder.py" in files and "os.py" in files


def test_split_is_deterministic_disjoint_and_capped():
    first = load_stdlib_corpus(train_chars=60_000, eval_chars=30_000)
    second = load_stdlib_corpus(train_chars=60_000, eval_chars=30_000)
    assert first == second
    assert not set(first.train_files) & set(first.eval_files)
    assert (sum(map(len, first.train)), sum(map(len, first.eval))) == (60_000, 30_000)
    # Held out: exactly the files of the named modules, in sorted order; none of them in train.
    held_out = [f for f in stdlib_files() if f.split("/")[0].removesuffix(".py") in HELD_OUT_MODULES]
    assert first.eval_files == held_out[: len(first.eval_files)]
    assert first.eval_files[0] == "argparse.py"
    assert first.eval[0] == (stdlib_root() / "argparse.py").read_text(encoding="utf-8")[:30_000]
    assert not [f for f in first.train_files if f.split("/")[0].removesuffix(".py") in HELD_OUT_MODULES]
    assert first.train_files == [f for f in stdlib_files() if f not in held_out][: len(first.train_files)]


def test_trained_tokenizer_loads_with_auto_tokenizer(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(tokenizer) == 320
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|endoftext|>", "<|pad|>", "<|bos|>")
    text = "def bisect(a, x):\n    return 'é∑ unseen'  # byte-level\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text.encode()) and tokenizer.decode(ids) == text
    assert 0 not in ids and 2 not in ids  # no special token added automatically


def test_tiny_llama_demo_end_to_end(tokenizer, tmp_path):
    config = tiny_llama_config(len(tokenizer), hidden=32, layers=2, heads=4, kv_heads=2)
    assert config["intermediate_size"] == 88 and config["num_key_value_heads"] == 2  # 8/3 * 32 = 85.3 -> 88
    torch.manual_seed(0)
    model = build_causal_lm(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(tmp_path, role="student")
    corpus = load_stdlib_corpus(train_chars=2_000, eval_chars=1_000)
    batch = tokenize([Record(completion=t) for t in corpus.train], loaded_tokenizer, seq_len=32, pack=True)
    assert batch["input_ids"].shape[1] == 32 and batch["attention_mask"].all()
    with torch.no_grad():
        output = loaded(input_ids=batch["input_ids"][:2], labels=batch["labels"][:2])
    assert output.logits.shape == (2, 32, 320)
    # HF shifts labels internally; the loss of an untrained model is near log(V).
    assert abs(output.loss.item() - torch.log(torch.tensor(320.0)).item()) < 0.5
