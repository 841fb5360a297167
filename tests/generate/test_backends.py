"""Generation: KV cache equals no cache token for token; budgets; the generate command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from distilflow.cli import main
from distilflow.errors import UserError
from distilflow.generate.backends import TransformersBackend, check_budget, sample_ids
from distilflow.generate.sampling import Sampling
from distilflow.models.hf import load_causal_lm

from .conftest import greedy_reference, write_jsonl


def test_kv_cache_generation_equals_uncached_greedy(model_dir, tokenizer):
    model, _ = load_causal_lm(model_dir, role="test", torch_dtype=torch.float32)
    model.eval()
    # Prompts of different lengths, so the batch is left-padded.
    prompts = [tokenizer(text)["input_ids"] for text in ("12+34=", "5+6=", "987+654=<think>")]
    greedy = Sampling(max_new_tokens=20, temperature=0.0)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cached = sample_ids(model, prompts, sampling=greedy, pad_token_id=pad, eos_token_id=eos, use_cache=True)
    uncached = sample_ids(model, prompts, sampling=greedy, pad_token_id=pad, eos_token_id=eos, use_cache=False)
    assert cached == uncached
    # And both equal the plain one-sequence-at-a-time loop (an independent implementation).
    for prompt, (ids, finished) in zip(prompts, cached):
        assert ids == greedy_reference(model, prompt, 20, eos)
        assert finished == (len(ids) < 20)


def test_backend_samples_n_and_cuts_stop_strings(model_dir, tokenizer):
    model, _ = load_causal_lm(model_dir, role="test", torch_dtype=torch.float32)
    backend = TransformersBackend(model, tokenizer, batch_size=3)
    torch.manual_seed(0)
    sampling = Sampling(max_new_tokens=8, temperature=1.0)
    out = backend.generate(["1+2=", "3+4="], n=2, sampling=sampling, special_tokens=True)
    assert [len(x) for x in out] == [2, 2]
    for completions in out:
        for c in completions:
            assert c.tokens <= 8 and c.finish in ("stop", "length")
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    plain = backend.generate(["1+2="], n=1, sampling=greedy, special_tokens=True)[0][0].text
    if len(plain) >= 3:
        stop = plain[2]
        cut = backend.generate(["1+2="], n=1, sampling=Sampling(12, 0.0, stop=(stop,)), special_tokens=True)[0][0]
        assert cut.text == plain[: plain.index(stop)] and cut.finish == "stop"


def test_budget_longer_than_positions_is_refused(model_dir):
    model, _ = load_causal_lm(model_dir, role="test")
    check_budget(14, 50, model, "p.jsonl: line 1")  # 64 positions: fits exactly
    with pytest.raises(UserError, match=r"p.jsonl: line 3: prompt of 15 tokens \+ max_new_tokens 50 exceeds"):
        check_budget(15, 50, model, "p.jsonl: line 3")


def test_generate_command_writes_resumable_jsonl(model_dir, tmp_path, capsys):
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(5)] + ["{cut"]
    )
    out = tmp_path / "gen.jsonl"
    args = [
        "generate",
        f"output_dir={tmp_path / 'run'}",
        f"generate.prompts={prompts}",
        f"generate.output={out}",
        f"generate.model={model_dir}",
        "generate.n=3",
        "generate.max_new_tokens=6",
        "generate.keep_truncated=true",
        "generate.verifier=none",
        "generate.on_error=skip",
        "generate.batch_size=4",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "5 prompts generated, 0 already done" in printed and "tokens/s" in printed
    # stderr is not a terminal here: plain progress lines as 'run' writes them, no tqdm frames.
    assert "\r" not in captured.err and "[generate] 5/5 prompts kept " in captured.err.splitlines()[-1]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["prompt"] for r in rows} <= {f"{i}+{i}=" for i in range(5)}
    assert all(r["prompt"].endswith("=") and "completion" in r for r in rows)
    summary = json.loads((tmp_path / "gen.jsonl.summary.json").read_text())
    assert summary["kept"] == len(rows) and summary["bad_lines_skipped"] == 1
    assert summary["kept"] + summary["duplicates"] == 15  # verifier none: only repeats are dropped
    before = out.read_text()
    assert main(args) == 0
    assert "0 prompts generated, 5 already done" in capsys.readouterr().out
    assert out.read_text() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("generate.n=0", "config key 'generate.n': 0 is not allowed; must be >= 1"),
        ("generate.max_new_tokens=61", "prompt of 4 tokens + max_new_tokens 61 exceeds the model's 64 positions"),
        ("generate.top_p=0", "config key 'generate.top_p'"),
        ("generate.verifier=fuzzy", "config key 'generate.verifier'"),
    ],
)
def test_generate_refusals_are_one_line_and_write_nothing(model_dir, tmp_path, capsys, override, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    out = tmp_path / "gen.jsonl"
    code = main(
        ["generate", f"generate.prompts={prompts}", f"generate.output={out}", f"generate.model={model_dir}", override]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() or out.read_text() == ""


def test_malformed_prompt_line_is_one_line_error(model_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1="}, "{cut"])
    code = main(["generate", f"generate.prompts={prompts}", f"generate.model={model_dir}", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{prompts}: line 2 is not valid JSON" in err and err.count("\n") == 1


def test_streamed_and_batched_greedy_completions_agree(model_dir, tokenizer):
    """One backend, two decoders: its KV-cache streaming loop (distilflow predict) and the batched
    transformers generate (distilflow generate) write the same greedy completion."""
    model, _ = load_causal_lm(model_dir, role="test", torch_dtype=torch.float32)
    backend = TransformersBackend(model, tokenizer)
    greedy = Sampling(max_new_tokens=12)
    assert greedy.greedy
    for text in ("12+34=", "987+654=<think>"):
        batched = backend.generate([text], n=1, sampling=greedy, special_tokens=True)[0][0].text
        streamed = "".join(backend.stream(backend.prompt_ids(text, chat=False), greedy))
        assert streamed == batched and streamed
