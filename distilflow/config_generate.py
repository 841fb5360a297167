"""Config sections of the generating side: ``generate`` (teacher-written samples, filtered and verified),
``on_policy`` (GKD: continuations sampled from the student) and ``reasoning`` (the built-in arith demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distilflow.config_kinds import ServerConfig
from distilflow.typed_config import help_field

_f = help_field


@dataclass
class GenerateConfig:
    prompts: str | None = _f(None, "JSONL prompt set: lines with 'prompt' or chat 'messages', optional 'answer', 'id'.")
    output: str | None = _f(None, "Output JSONL of kept samples (default <run_dir>/generated.jsonl); resumable.")
    model: str | None = _f(
        None, "Model folder that generates (default: teacher.model.hf.path, else this run's trained teacher/hf)."
    )
    backend: Literal["transformers", "vllm"] = _f(
        "transformers",
        "transformers generate (KV cache, batched), or vllm: a served model when server.url is set (tested against "
        "vLLM's CPU build), else vLLM in this process (pip install vllm; tested with the CPU build).",
    )
    server: ServerConfig = _f(
        ServerConfig(), "backend vllm: sample from this served model (generate.model then only gives the tokenizer)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto",
        "Weights' dtype in this process: auto = transformers: the checkpoint's; vLLM: its own rule (a float32 "
        "checkpoint runs in bfloat16 or float16). Not used with server.url (the server's --dtype decides).",
    )
    n: int = _f(1, "Completions sampled per prompt (>= 1).")
    batch_size: int = _f(16, "transformers: sequences generated together (prompts x n are split into batches).")
    temperature: float = _f(0.7, "Sampling temperature (0 = greedy decoding).")
    top_p: float = _f(1.0, "Nucleus sampling: smallest set of tokens with this total probability, in (0, 1].")
    max_new_tokens: int = _f(256, "Generated tokens per completion at most (prompt + this <= model positions).")
    stop: list[str] = _f([], "Stop strings: a completion ends before the first one (as in vLLM).")
    chat_template: bool = _f(False, "Render plain 'prompt' lines as a user message with the chat template.")
    on_error: Literal["raise", "skip"] = _f("raise", "A malformed prompt line: 'raise' (name file and line) or 'skip'.")
    min_tokens: int = _f(1, "Length filter: reject completions shorter than this many tokens.")
    max_tokens: int | None = _f(None, "Length filter: reject completions longer than this many tokens (None = off).")
    keep_truncated: bool = _f(False, "Keep completions cut by max_new_tokens (default: rejected as 'truncated').")
    format: str | None = _f(
        None, "Format filter: a regex the whole completion must match, e.g. '<think>.+</think>\\s*\\S.*'."
    )
    answer_pattern: str | None = _f(
        None, "Regex extracting the final answer (group 1); default: text after the last </think>, else last line."
    )
    verifier: str = _f(
        "exact",
        "none, exact (extracted == answer), regex (answer is a regex), math (math-verify, optional extra), "
        "or 'module.path:function' called with any of the keywords prompt, completion, answer, extracted.",
    )
    dedup: bool = _f(True, "Drop repeated completions of the same prompt.")


@dataclass
class OnPolicyConfig:
    lmbda: float = _f(
        0.0,
        "On-policy distillation (GKD, Agarwal et al. 2024): probability that a step's continuations are sampled "
        "from the current student and scored by the teacher (0 = off; needs a kd phase; a teacher of another "
        "tokenizer reads the samples re-tokenized).",
    )
    start_fraction: float = _f(
        0.0, "Share of the student's steps trained on the fixed data before on-policy sampling starts, in [0, 1)."
    )
    max_new_tokens: int = _f(64, "Tokens the student samples per prompt on an on-policy step.")
    temperature: float = _f(1.0, "Student sampling temperature on on-policy steps (> 0).")
    top_p: float = _f(1.0, "Student nucleus sampling on on-policy steps, in (0, 1].")


@dataclass
class ReasoningConfig:
    task: Literal["off", "arith"] = _f(
        "off",
        "arith: the built-in reasoning demo (teacher, generated traces, SFT vs sequence-level KD vs "
        "+token-level KD vs on-policy GKD); 'distilflow run' then runs it instead of teacher/baseline/student.",
    )
    digits: int = _f(3, "arith difficulty: digits per operand (1-9).")
    operands: int = _f(2, "arith difficulty: numbers added per problem (2-5).")
    teacher_problems: int = _f(20000, "arith: problems with worked solutions the teacher is trained on.")
    gold_problems: int = _f(500, "arith: problems with worked solutions available to the student (SFT data).")
    fresh_prompts: int = _f(4000, "arith: prompts with reference answers only; the teacher writes their traces.")
    eval_prompts: int = _f(500, "arith: held-out prompts scored by exact match of the final answer.")
    methods: list[Literal["sft", "seq_kd", "seq_token_kd", "gkd"]] = _f(
        ["sft", "seq_kd", "seq_token_kd", "gkd"], "Students trained at equal steps, each from the same init."
    )
