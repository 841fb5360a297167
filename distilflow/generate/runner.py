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
from distilflow.generate.writer import SampleWriter


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
) -> GenerateStats:
    """Generate for every prompt the writer has not finished; returns the counts of this call.

    Prompts are rendered and their token budgets checked before anything is generated, so a
    prompt too long for the model fails before a single line is written.
    """
    stats = GenerateStats(prompts=len(prompts))
    todo = [p for p in prompts if not writer.done(p.id)]
    stats.already_done = len(prompts) - len(todo)
    rendered = [render_prompt(p, backend.tokenizer, chat_template=chat_template) for p in todo]
    plain = [p.messages is None and not chat_template for p in todo]
    if budget_model is not None:
        for p, text, special in zip(todo, rendered, plain):
            tokens = len(backend.encode(text, special_tokens=special))
            check_budget(tokens, sampling.max_new_tokens, budget_model, p.where)
    reasons: collections.Counter[str] = collections.Counter()
    bar = _progress(len(todo), show_progress)
    began = time.monotonic()
    # Chat-rendered prompts carry their own special tokens; plain ones get the tokenizer's (e.g. BOS),
    # exactly as the text data path tokenizes a prompt for training.
    for special in (True, False):
        group = [(prompt, text) for prompt, text, is_plain in zip(todo, rendered, plain) if is_plain == special]
        for start in range(0, len(group), prompts_per_call):
            chunk = group[start : start + prompts_per_call]
            outputs = backend.generate([text for _, text in chunk], n=n, sampling=sampling, special_tokens=special)
            for (prompt, _), completions in zip(chunk, outputs):
                kept, seen, counts = [], set(), collections.Counter()
                for index, completion in enumerate(completions):
                    stats.tokens += completion.tokens
                    if dedup and completion.text in seen:
                        counts["duplicate"] += 1
                        continue
                    seen.add(completion.text)
                    verdict = checker(
                        prompt=prompt, completion=completion.text, tokens=completion.tokens, finish=completion.finish
                    )
                    if verdict.kept:
                        kept.append(_record(prompt, completion, index, verdict.extracted, chat_template))
                    else:
                        counts[verdict.reason] += 1
                duplicates = counts.pop("duplicate", 0)
                writer.write_prompt(
                    prompt.id, kept, {"kept": len(kept), "rejected": dict(counts), "duplicates": duplicates}
                )
                stats.generated_prompts += 1
                stats.kept += len(kept)
                stats.duplicates += duplicates
                stats.rejected += sum(counts.values())
                reasons.update(counts)
                elapsed = time.monotonic() - began
                bar.update(1)
                speed = f"{stats.tokens / max(elapsed, 1e-9):.0f}"
                bar.set_postfix(kept=stats.kept, rejected=stats.rejected, tok_s=speed)
    bar.close()
    stats.seconds = time.monotonic() - began
    stats.reasons = dict(reasons)
    return stats


def _progress(total: int, show: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="prompt", disable=not show, file=sys.stderr, dynamic_ncols=True)


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
    if not g.prompts:
        raise UserError("config key 'generate.prompts' is not set; give a JSONL prompt file")
    prompt_set = read_prompts(g.prompts, on_error=g.on_error)
    if prompt_set.skipped:
        print(
            f"distilflow: skipped {prompt_set.skipped} bad prompt lines (generate.on_error=skip); "
            f"first: {prompt_set.problems[0]}",
            file=sys.stderr,
        )
    checker = checker_from_config(g)
    folder = _model_folder(cfg)
    sampling = Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, stop=tuple(g.stop))
    torch.manual_seed(cfg.seed)
    budget_model = None
    trust = bool(cfg.teacher.model.hf and cfg.teacher.model.hf.trust_remote_code)
    if g.backend == "vllm" and g.server.url:
        from distilflow.generate.served import ServedBackend, load_tokenizer

        tokenizer = load_tokenizer(folder, trust_remote_code=trust)
        s = g.server
        backend: Any = ServedBackend(
            s.url, tokenizer, model=s.model, seed=cfg.seed, timeout_s=s.timeout_s, max_retries=s.max_retries
        )
        budget_model = backend.max_positions
    elif g.backend == "vllm":
        backend = VLLMBackend(folder, trust_remote_code=trust, seed=cfg.seed, dtype=g.dtype)
    else:
        from distilflow.device import resolve_device
        from distilflow.models.hf import load_causal_lm

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        dtype = None if g.dtype == "auto" else getattr(torch, g.dtype)
        model, tokenizer = load_causal_lm(folder, role="generate model", trust_remote_code=trust, torch_dtype=dtype)
        model = model.to(resolve_device(cfg.device))
        backend = TransformersBackend(model, tokenizer, batch_size=g.batch_size)
        budget_model = model
    output = Path(g.output) if g.output else cfg.run_dir / "generated.jsonl"
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
    )
    stats.bad_lines_skipped = prompt_set.skipped
    summary = {
        **stats.as_dict(),
        "output": str(output),
        "model": str(folder),
        "server": g.server.url,
        "samples_in_file": writer.samples_on_disk,
    }
    output.with_name(output.name + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
