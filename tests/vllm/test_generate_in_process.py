"""``generate.backend=vllm`` without a server URL: vLLM's offline ``LLM`` in the generating process, for
real. distilflow runs inside the vLLM CPU venv (.vllm-venv: the same torch 2.13.0 CPU build, and
distilflow's dependencies), started as ``python -m distilflow generate`` there; its greedy completions
equal the transformers backend's run here on the same float32 weights (``generate.dtype=float32``;
vLLM's ``auto`` would run a float32 checkpoint in bfloat16), under the precondition of
test_generate_served.py (the greedy path has no near ties). One engine start (about a minute)."""

from __future__ import annotations

import json
import subprocess

from .generation import PROMPTS, generate, generate_args, write_prompts
from .launch import REPO, vllm_env


def test_in_process_vllm_generation_equals_transformers(vllm_venv, served_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    greedy = ["generate.temperature=0", "generate.n=2", "generate.dtype=float32"]
    local = generate(tmp_path, served_dir, prompts, tmp_path / "local.jsonl", *greedy)
    output = tmp_path / "in_process.jsonl"
    command = [str(vllm_venv), "-m", "distilflow"]
    command += generate_args(tmp_path, served_dir, prompts, output, "generate.backend=vllm", *greedy)
    done = subprocess.run(
        command, cwd=REPO, env=vllm_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    in_process = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(in_process) == len(PROMPTS)  # n=2 greedy: one completion twice, the duplicate dropped
    pick = [(r["id"], r["completion"], r["tokens"], r["finish"]) for r in in_process]
    assert pick == [(r["id"], r["completion"], r["tokens"], r["finish"]) for r in local]
    summary = json.loads((tmp_path / "in_process.jsonl.summary.json").read_text())
    assert summary["duplicates"] == len(PROMPTS)
