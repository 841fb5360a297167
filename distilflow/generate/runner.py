"""``distilflow generate``: prompts -> n completions each -> filters + verifier -> resumable JSONL.

Each output line is a training record for the text data path (``prompt`` + ``completion``, or chat
``messages`` ending with the assistant's completion) plus metadata: ``id``, ``sample``, ``answer``,
``extracted``, ``tokens``, ``finish``. Point ``data.text.path`` at the file for sequence-level KD.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distilflow.errors import UserError
from distilflow.generate.backends import Completion, TransformersBackend, VLLMBackend, check_budget
from distilflow.generate.prompts import Prompt, read_prompts, render_prompt
from distilflow.generate.sampling import Sampling
from distilflow.generate.verify import Checker, load_verifier
from distilflow.generate.writer import SUMMARY_SUFFIX, SampleWriter, check_output_path
from distilflow.storage import write_text
from distilflow.train import dist
from distilflow.train.logging import CountProgress


@dataclass
class GenerateStats:
    prompts: int = 0  # prompts in the set
    already_done: int = 0  # finished by an earlier (interrupted) run, skipped
    generated_prompts: int = 0
    kept: int = 0
    rejected: int = 0
    duplicates: int = 0
    tokens: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    bad_lines_skipped: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["tokens_per_s"] = round(self.tokens / self.seconds, 1) if self.seconds else 0.0
        out["seconds"] = round(self.seconds, 2)
        return out


def checker_from_config(g: Any) -> Checker:
    return Checker(
        verifier=load_verifier(g.verifier),
        answer_pattern=g.answer_pattern,
        format=g.format,
        min_tokens=g.min_tokens,
        max_tokens=g.max_tokens,
        keep_truncated=g.keep_truncated,
    )


def _record(prompt: Prompt, completion: Completion, index: int, extracted: str | None, chat: bool) -> dict[str, Any]:
    base = prompt.as_record()
    if prompt.messages is not None or chat:
        messages = prompt.messages or [{"role": "user", "content": prompt.text or ""}]
        base.pop("prompt", None)
        base["messages"] = [*messages, {"role": "assistant", "content": completion.text}]
    else:
        base["completion"] = completion.text
    return {**base, "sample": index, "extracted": extracted, "tokens": completion.tokens, "finish": completion.finish}


def generate_to_file(
    prompts: list[Prompt],
    backend: Any,
    checker: Checker,
    writer: SampleWriter,
    *,
    n: int,
    sampling: Sampling,
    chat_template: bool = False,
    dedup: bool = True,
    prompts_per_call: int = 16,
    budget_model: Any = None,
    show_progress: bool = True,
    seed: int | None = None,
) -> GenerateStats:
    """Generate for every prompt the writer has not finished; returns the counts of this call.

    Prompts are rendered and their token budgets checked before anything is generated, so a
    prompt too long for the model fails before a single line is written. The backend is called on
    fixed groups of ``prompts_per_call`` prompts of the whole prompt set; with ``seed``, each call
    draws from torch's random stream seeded by ``seed`` and the call's index. So a run resumed after a
    kill makes the calls an uninterrupted run makes, with the same draws, and writes the same rows: a
    call the kill cut short (some of its prompts written) is made again in full and only its
    unfinished prompts are written. Without ``seed`` the caller's random stream is used.
    """
    stats = GenerateStats(prompts=len(prompts))
    stats.already_done = sum(1 for p in prompts if writer.done(p.id))
    calls = [
        (index, special, chunk)
        for index, (special, chunk) in enumerate(_calls(prompts, chat_template, prompts_per_call))
        if not all(writer.done(p.id) for p in chunk)  # a call whose prompts are all written is not made again
    ]
    rendered = {
        index: [render_prompt(p, backend.tokenizer, chat_template=chat_template) for p in chunk]
        for index, _, chunk in calls
    }
    if budget_model is not None:
        with dist.input_checks():  # every rank meets a prompt too long alike
            for index, special, chunk in calls:
                for p, text in zip(chunk, rendered[index]):
                    tokens = len(backend.encode(text, special_tokens=special))
                    check_budget(tokens, sampling.max_new_tokens, budget_model, p.where)
    reasons: collections.Counter[str] = collections.Counter()
    verified_once = False  # the first batch that reached the checker has been looked at
    bar = CountProgress("generate", len(prompts) - stats.already_done, "prompts", show=show_progress)
    began = time.monotonic()
    for index, special, chunk in calls:
        if seed is not None:
            torch.manual_seed(seed * 1_000_003 + index)
        outputs = backend.generate(rendered[index], n=n, sampling=sampling, special_tokens=special)
        todo = [(prompt, completions) for prompt, completions in zip(chunk, outputs) if not writer.done(prompt.id)]
        # Prompts written before a kill are generated again only for the draws of the others.
        judged = [_judge(prompt, completions, checker, dedup, chat_template) for prompt, completions in todo]
        if not verified_once:
            verified_once = _stop_if_verifier_always_fails(checker, judged)
        for (prompt, _), (kept, tokens, counts) in zip(todo, judged):
            stats.tokens += tokens
            duplicates = counts.pop("duplicate", 0)
            summary = {"kept": len(kept), "rejected": dict(counts), "duplicates": duplicates}
            writer.write_prompt(prompt.id, kept, summary)
            stats.generated_prompts += 1
            stats.kept += len(kept)
            stats.duplicates += duplicates
            stats.rejected += sum(counts.values())
            reasons.update(counts)
            speed = f"{stats.tokens / max(time.monotonic() - began, 1e-9):.0f}"
            bar.update(stats.generated_prompts, kept=stats.kept, rejected=stats.rejected, tok_s=speed)
    bar.close()
    stats.seconds = time.monotonic() - began
    stats.reasons = dict(reasons)
    return stats


def _judge(
    prompt: Prompt, completions: list[Completion], checker: Checker, dedup: bool, chat: bool
) -> tuple[list[dict[str, Any]], int, collections.Counter[str]]:
    """The kept records of one prompt's completions, their tokens, and the count of each rejection."""
    kept, seen, counts, tokens = [], set(), collections.Counter(), 0
    for index, completion in enumerate(completions):
        tokens += completion.tokens
        if dedup and completion.text in seen:
            counts["duplicate"] += 1
            continue
        seen.add(completion.text)
        verdict = checker(prompt=prompt, completion=completion.text, tokens=completion.tokens, finish=completion.finish)
        if verdict.kept:
            kept.append(_record(prompt, completion, index, verdict.extracted, chat))
        else:
            counts[verdict.reason] += 1
    return kept, tokens, counts


def _stop_if_verifier_always_fails(checker: Checker, judged: list[tuple[list, int, collections.Counter[str]]]) -> bool:
    """One line instead of a whole run of rejections: the verifier raised on every sample of the first
    batch it was called on (a wrong signature, a missing dependency, a bug), so nothing would be kept.
    Returns whether the verifier was called in this batch (then later batches are not looked at)."""
    errors = collections.Counter()
    for _, _, counts in judged:
        errors.update({reason: n for reason, n in counts.items() if reason.startswith("verifier error")})
    called = errors.total() + sum(len(kept) + counts["wrong"] for kept, _, counts in judged)
    if called and errors.total() == called:
        spec = getattr(checker.verifier, "spec", "the verifier")
        first = next(iter(errors)).removeprefix("verifier error: ")  # a Counter keeps the order of first sight
        raise UserError(
            f"generate.verifier {spec!r} raised on every sample of the first batch ({called} samples; first: "
            f"{first}); nothing would be kept: fix the verifier (README: a verifier of your own) and run again"
        )
    return called > 0


def _calls(prompts: list[Prompt], chat_template: bool, per_call: int) -> list[tuple[bool, list[Prompt]]]:
    """The backend calls over the whole prompt set: (special tokens, prompts), plain prompts first.

    Chat-rendered prompts carry their own special tokens; plain ones get the tokenizer's (e.g. BOS),
    exactly as the text data path tokenizes a prompt for training."""
    out = []
    for special in (True, False):
        group = [p for p in prompts if (p.messages is None and not chat_template) == special]
        out += [(special, group[start : start + per_call]) for start in range(0, len(group), per_call)]
    return out


def _model_folder(cfg: Any) -> Path:
    g = cfg.generate
    if g.model:
        return Path(g.model)
    if cfg.teacher.model.folder:
        return Path(cfg.teacher.model.folder)
    trained = cfg.run_dir / "teacher" / "hf"
    if not trained.is_dir():
        raise UserError(
            f"no model to generate with: set generate.model (a save_pretrained folder) or teacher.model.hf.path, "
            f"or train this run's teacher first (expected '{trained}')"
        )
    return trained


def run_generate(cfg: Any, *, show_progress: bool = True) -> dict[str, Any]:
    """The ``distilflow generate`` command; returns (and writes next to the output) the summary."""
    g = cfg.generate
    with dist.input_checks():  # every rank meets these alike under torchrun: rank 0 alone reports them
        if not g.prompts:
            raise UserError("config key 'generate.prompts' is not set; give a JSONL prompt file")
        prompt_set = read_prompts(g.prompts, on_error=g.on_error)
        checker = checker_from_config(g)
        output = Path(g.output) if g.output else cfg.run_dir / "generated.jsonl"
        check_output_path(output)  # before the model is loaded
        folder = _model_folder(cfg)
        backend, budget_model = _backend(cfg, folder)
    if prompt_set.skipped:
        print(
            f"distilflow: skipped {prompt_set.skipped} bad prompt lines (generate.on_error=skip); "
            f"first: {prompt_set.problems[0]}",
            file=sys.stderr,
        )
    sampling = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, stop=tuple(g.stop))
    writer = SampleWriter(output)
    stats = generate_to_file(
        prompt_set.prompts,
        backend,
        checker,
        writer,
        n=g.n,
        sampling=sampling,
        chat_template=g.chat_template,
        dedup=g.dedup,
        # vLLM batches internally; calls of 256 prompts keep what a kill can lose small.
        prompts_per_call=max(1, g.batch_size // g.n) if g.backend == "transformers" else 256,
        budget_model=budget_model,
        show_progress=show_progress,
        seed=cfg.seed,  # a killed generate resumes with the draws of an uninterrupted one
    )
    stats.bad_lines_skipped = prompt_set.skipped
    summary = {
        **stats.as_dict(),
        "output": str(output),
        "model": str(folder),
        "server": g.server.url,
        "samples_in_file": writer.samples_on_disk,
    }
    write_text(output.with_name(output.name + SUMMARY_SUFFIX), json.dumps(summary, indent=2) + "\n")
    return summary


def _backend(cfg: Any, folder: Path) -> tuple[Any, Any]:
    """The backend that generates, and what bounds a prompt's budget: the model (transformers), the
    server's max_model_len (a vLLM server), or None (vLLM in process checks it itself)."""
    g = cfg.generate
    trust = bool(cfg.teacher.model.hf and cfg.teacher.model.hf.trust_remote_code)
    if g.backend == "vllm" and g.server.url:
        from distilflow.generate.served import ServedBackend, load_tokenizer

        tokenizer = load_tokenizer(folder, trust_remote_code=trust)
        s = g.server
        backend = ServedBackend(
            s.url, tokenizer, model=s.model, seed=cfg.seed, timeout_s=s.timeout_s, max_retries=s.max_retries
        )
        return backend, backend.max_positions
    if g.backend == "vllm":
        return VLLMBackend(folder, trust_remote_code=trust, seed=cfg.seed, dtype=g.dtype), None
    from distilflow.device import resolve_device
    from distilflow.models.hf import load_causal_lm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = None if g.dtype == "auto" else getattr(torch, g.dtype)
    model, tokenizer = load_causal_lm(folder, role="generate model", trust_remote_code=trust, torch_dtype=dtype)
    model = model.to(resolve_device(cfg.device))
    return TransformersBackend(model, tokenizer, batch_size=g.batch_size), model
