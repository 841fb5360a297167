"""``distilflow generate`` with ``generate.backend=vllm`` and ``generate.server.url`` against a real vLLM
CPU server: greedy completions equal the transformers backend's on the same weights, and the runner's
dedup, resume and seeded sampling work through the served backend."""

from __future__ import annotations

import json

import torch

from distilflow.cli import main

from .generation import MAX_NEW, PROMPTS, generate, write_prompts
from .launch import MODEL_NAME


def served_args(vllm_server) -> list[str]:
    return ["generate.backend=vllm", f"generate.server.url={vllm_server.url}", f"generate.server.model={MODEL_NAME}"]


def test_greedy_generation_equals_transformers(vllm_server, served_dir, reference_model, served_tokenizer, tmp_path):
    # Precondition that makes greedy decoding kernel-independent: at every step of the local greedy
    # path the top two logits are far apart compared with float32 kernel differences (~1e-5).
    for text in PROMPTS:
        ids = torch.tensor([served_tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = reference_model.generate(
                ids, max_new_tokens=MAX_NEW, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        for scores in out.scores:
            top2 = scores[0].topk(2).values
            assert float(top2[0] - top2[1]) > 1e-3, f"near tie on the greedy path of {text!r}; pick another prompt"
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    greedy = ["generate.temperature=0", "generate.n=2"]  # two equal samples each: the second is a duplicate
    local = generate(tmp_path, served_dir, prompts, tmp_path / "local.jsonl", *greedy)
    served = generate(tmp_path, served_dir, prompts, tmp_path / "served.jsonl", *greedy, *served_args(vllm_server))
    assert len(served) == len(PROMPTS)  # dedup dropped one of each pair
    pick = [(r["id"], r["completion"], r["tokens"], r["finish"]) for r in served]
    assert pick == [(r["id"], r["completion"], r["tokens"], r["finish"]) for r in local]
    summary = json.loads((tmp_path / "served.jsonl.summary.json").read_text())
    assert summary["duplicates"] == len(PROMPTS) and summary["server"] == vllm_server.url


def test_sampling_is_seeded_and_resumes(vllm_server, served_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    sampled = ["generate.temperature=1.0", "generate.n=3", "seed=7", *served_args(vllm_server)]
    first = generate(tmp_path, served_dir, prompts, tmp_path / "a.jsonl", *sampled)
    again = generate(tmp_path, served_dir, prompts, tmp_path / "b.jsonl", *sampled)
    assert first == again  # the request seed makes sampling reproducible
    assert {r["id"] for r in first} == {"p0", "p1", "p2"}
    assert all(1 <= r["tokens"] <= MAX_NEW and r["finish"] in ("stop", "length") for r in first)
    assert all(r["finish"] == "stop" for r in first if r["tokens"] < MAX_NEW)
    # Resume: two more prompts; the three finished ones are not generated again.
    write_prompts(prompts, [*PROMPTS, "def heappush(", "# Copyright"])
    resumed = generate(tmp_path, served_dir, prompts, tmp_path / "a.jsonl", *sampled)
    summary = json.loads((tmp_path / "a.jsonl.summary.json").read_text())
    assert (summary["already_done"], summary["generated_prompts"]) == (3, 2)
    assert resumed[: len(first)] == first and {r["id"] for r in resumed} == {"p0", "p1", "p2", "p3", "p4"}


def test_wrong_served_model_is_one_line(vllm_server, served_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:1])
    args = ["generate", f"generate.prompts={prompts}", f"generate.model={served_dir}", "generate.backend=vllm"]
    code = main([*args, f"generate.server.url={vllm_server.url}", "generate.server.model=other"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "serves ['tiny-teacher'], not 'other'" in err
