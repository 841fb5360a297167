"""The vLLM backend's adapter against a stand-in ``vllm`` module (real vLLM is not installed here).

This checks only how distilflow calls vLLM's documented offline API (``LLM``, ``SamplingParams``,
``LLM.generate`` outputs) and maps its results; vLLM itself is untested in this suite.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass

import pytest

from distilflow.cli import main

from .conftest import write_jsonl


@dataclass
class _Out:
    text: str
    token_ids: list[int]
    finish_reason: str


def _fake_vllm(tokenizer, calls: list):
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, model, trust_remote_code, seed, dtype):
            calls.append(("init", model, trust_remote_code, seed))

        def get_tokenizer(self):
            return tokenizer

        def generate(self, prompts, params, use_tqdm):
            calls.append(("generate", prompts, params.kwargs))
            outputs = []
            for _ in prompts:
                completions = [_Out("</think>4", [5, 6], "stop"), _Out("</think>5", [5, 7, 8], "length")]
                outputs.append(types.SimpleNamespace(outputs=completions[: params.kwargs["n"]]))
            return outputs

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_backend_maps_params_and_outputs(tmp_path, tokenizer, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(tokenizer, calls))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "answer": "4"}, {"prompt": "1+3=", "answer": "4"}])
    out = tmp_path / "gen.jsonl"
    args = [
        "generate",
        f"output_dir={tmp_path}",
        f"generate.prompts={prompts}",
        f"generate.output={out}",
        f"generate.model={tmp_path}",
        "generate.backend=vllm",
        "generate.n=2",
        "generate.temperature=0.5",
        "generate.max_new_tokens=7",
        'generate.stop=["##"]',
    ]
    assert main(args) == 0
    assert "kept 2, rejected 2 (truncated 2)" in capsys.readouterr().out
    init, generate = calls
    assert init == ("init", str(tmp_path), False, 0)
    assert generate[2] == {"n": 2, "temperature": 0.5, "top_p": 1.0, "max_tokens": 7, "stop": ["##"]}
    assert generate[1] == [
        {"prompt_token_ids": tokenizer("2+2=")["input_ids"]},
        {"prompt_token_ids": tokenizer("1+3=")["input_ids"]},
    ]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["completion"], r["tokens"]) for r in rows] == [
        ("2+2=", "</think>4", 2),
        ("1+3=", "</think>4", 2),
    ]


def test_missing_vllm_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2="}])
    code = main(["generate", f"generate.prompts={prompts}", f"generate.model={tmp_path}", "generate.backend=vllm"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install vllm" in err and err.count("\n") == 1


@pytest.mark.parametrize("backend", ["vllm"])
def test_backend_name_in_config(backend):
    from distilflow.config import load_config

    assert load_config(None, [f"generate.backend={backend}"]).generate.backend == backend
