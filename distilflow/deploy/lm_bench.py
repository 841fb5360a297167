"""Generation benchmark of a causal-LM student: eager transformers ``generate`` vs ONNX Runtime GenAI.

Every variant runs in this process with the same thread count on the same prompts (the first
``prompt_tokens`` tokens of held-out rows, batch 1 and 8), decoding exactly ``new_tokens`` tokens
greedily (end-of-text suppressed, so every variant does the same work):

- prefill latency: wall time from the call to the first new token (set-up, prompt pass, one pick);
- decode tokens/s: ``batch * (new_tokens - 1)`` over the time from the first to the last new
  token: the KV-cached steps (medians of ``repeats`` timed calls after one warm-up, interleaved
  across variants);
- size on disk: the fp32 safetensors for torch, the model files (graph + weights) for GenAI;
- peak memory: the peak RSS (VmHWM) of a child process that imports only what the variant needs, loads it
  and generates the batch-8 workload once (so it includes the runtime itself: torch + transformers
  for eager, onnxruntime-genai for the others);
- perplexity: teacher-forced over the same held-out rows for every variant (GenAI models through
  onnxruntime on their decoder with an empty KV cache), by :func:`distilflow.deploy.bench.quality`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distilflow.deploy.genai import logits_function, model_size, open_model

BATCH_SIZES = (1, 8)
LogitsFn = Callable[
    [dict[str, np.ndarray]], np.ndarray
]  # as in deploy.bench (not imported: the child stays torch-free)
GenerateFn = Callable[[np.ndarray, int], tuple[float, float]]
"""(prompts (B, P) token ids, new tokens) -> (seconds to the first new token, seconds of the remaining steps)."""


@dataclass
class GenVariant:
    name: str
    generate: GenerateFn
    logits: LogitsFn
    size_bytes: int
    spec: dict[str, Any] = field(default_factory=dict)  # how a child process loads it (peak memory)


def torch_generate_fn(model: Any, pad_token_id: int | None) -> GenerateFn:
    """transformers ``generate`` with its KV cache, greedy, exactly ``new`` tokens; timed by a streamer."""
    import torch

    class Clock:
        """``generate`` calls put() with the prompt, then once per generated token (all rows at once)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    @torch.no_grad()
    def run(prompts: np.ndarray, new: int) -> tuple[float, float]:
        ids = torch.from_numpy(prompts.astype(np.int64))
        clock = Clock()
        began = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            use_cache=True,
            pad_token_id=pad_token_id,
            streamer=clock,
        )
        ticks = clock.times[1:]  # (new,) one per generated token
        return ticks[0] - began, ticks[-1] - ticks[0]

    return run


def genai_generate_fn(model: Any) -> GenerateFn:
    """ONNX Runtime GenAI's generator, greedy, exactly ``new`` tokens (min_length = max_length).

    The first ``generate_next_token`` picks from the logits of the prompt pass (``append_tokens``);
    each later one runs the decoder on the previous token, as one step of ``generate`` does.
    """
    import onnxruntime_genai as og

    def run(prompts: np.ndarray, new: int) -> tuple[float, float]:
        began = time.perf_counter()
        params = og.GeneratorParams(model)
        length = prompts.shape[1] + new
        params.set_search_options(do_sample=False, max_length=length, min_length=length, batch_size=prompts.shape[0])
        generator = og.Generator(model, params)
        generator.append_tokens(prompts.astype(np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        return first - began, time.perf_counter() - first

    return run


def ort_generate_fn(session: Any) -> GenerateFn:
    """Greedy generation with the full-sequence ONNX export of :mod:`distilflow.deploy.export` (no KV
    cache: each new token is one pass over the whole sequence so far, as ``deploy`` ships it)."""

    def run(prompts: np.ndarray, new: int) -> tuple[float, float]:
        ids = prompts.astype(np.int64)
        began = time.perf_counter()
        first = began
        for step in range(new):
            logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
            ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)  # (B, T + 1)
            if step == 0:
                first = time.perf_counter()
        return first - began, time.perf_counter() - first

    return run


def torch_variant(name: str, hf_dir: Path, threads: int) -> GenVariant:
    import torch
    from transformers import AutoModelForCausalLM

    from distilflow.deploy.export import logits_module
    from distilflow.models.hf import no_progress_bars

    torch.set_num_threads(threads)
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).float().eval()
    module = logits_module(model, "causal_lm").eval()

    @torch.no_grad()
    def logits(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).float().numpy()

    size = sum(p.stat().st_size for p in Path(hf_dir).glob("*.safetensors"))
    spec = {"kind": "torch", "path": str(hf_dir), "threads": threads, "pad": model.config.pad_token_id}
    return GenVariant(name, torch_generate_fn(model, model.config.pad_token_id), logits, size, spec)


def genai_variant(name: str, folder: Path, threads: int) -> GenVariant:
    model = open_model(folder, threads)
    spec = {"kind": "genai", "path": str(folder), "threads": threads}
    return GenVariant(name, genai_generate_fn(model), logits_function(folder, threads), model_size(folder), spec)


def _summary(runs: list[tuple[float, float]], batch: int, new_tokens: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s over the ``new_tokens - 1`` steps after the first) from medians of ``runs``."""
    first = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return first * 1000, batch * (new_tokens - 1) / max(decode, 1e-9)


def peak_memory_mb(spec: dict[str, Any], prompts: np.ndarray, new_tokens: int) -> dict[str, float]:
    """Peak RSS of a fresh child that loads the variant and generates ``prompts`` once (deploy/memory.py)."""
    from distilflow.deploy.memory import peak_memory_mb as child_peak

    return child_peak({**spec, "prompts": prompts.tolist(), "new_tokens": new_tokens})


def prompt_rows(data: dict[str, np.ndarray], batch: int, prompt_tokens: int) -> np.ndarray:
    """The first ``prompt_tokens`` tokens of the first ``batch`` held-out rows (repeated if fewer)."""
    ids = data["input_ids"]
    if ids.shape[1] < prompt_tokens:
        raise ValueError(f"held-out rows have {ids.shape[1]} tokens, fewer than prompt_tokens {prompt_tokens}")
    return np.ascontiguousarray(ids[np.arange(batch) % len(ids), :prompt_tokens])


def benchmark_generation(
    variants: list[GenVariant],
    data: dict[str, np.ndarray] | None,
    *,
    prompts: dict[int, np.ndarray],
    new_tokens: int,
    repeats: int,
    memory: bool = True,
) -> dict[str, dict[str, float]]:
    """One row per variant: size, prefill ms and decode tokens/s per batch size, peak RSS, perplexity."""
    from distilflow.deploy.bench import quality

    # Timed calls are interleaved (every variant once per round), so that a load change on a shared
    # machine hits all variants alike instead of whichever ran during it.
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for round_ in range(repeats + 1):  # round 0: warm-up
        for variant in variants:
            for batch, rows in prompts.items():
                timing = variant.generate(rows, new_tokens)
                if round_:
                    runs.setdefault((variant.name, batch), []).append(timing)
    table: dict[str, dict[str, float]] = {}
    for variant in variants:
        row: dict[str, float] = {"size_bytes": variant.size_bytes}
        for batch, rows in prompts.items():
            prefill, rate = _summary(runs[variant.name, batch], rows.shape[0], new_tokens)
            row[f"prefill_ms_b{batch}"] = round(prefill, 3)
            row[f"decode_tokens_per_s_b{batch}"] = round(rate, 1)
        if memory and variant.spec:
            row.update(peak_memory_mb(variant.spec, prompts[max(prompts)], new_tokens))
        if data is not None:
            row["perplexity"] = quality(variant.logits, data, "causal_lm", batch=16)["perplexity"]
        table[variant.name] = row
    return table


def markdown(table: dict[str, dict[str, float]], *, threads: int, new_tokens: int, prompt_tokens: int) -> str:
    base = table.get("torch_eager")
    batches = sorted({int(k.rsplit("_b", 1)[1]) for row in table.values() for k in row if k.startswith("decode_")})
    head = ["variant", "size MB", "fp32 size / size"]
    for b in batches:
        head += [f"prefill ms b{b}", f"decode tok/s b{b}", f"x eager b{b}"]
    head += ["peak RSS MB", "perplexity", "ppl vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def ratio(value: float | None, ref: float | None) -> str:
        return f"{value / ref:.2f}x" if value and ref else ""

    for name, row in table.items():
        cells = [name, f"{row['size_bytes'] / 1e6:.2f}", ratio(base and base["size_bytes"], row["size_bytes"])]
        for b in batches:
            rate = row[f"decode_tokens_per_s_b{b}"]
            cells += [
                f"{row[f'prefill_ms_b{b}']:.1f}",
                f"{rate:.0f}",
                ratio(rate, base and base[f"decode_tokens_per_s_b{b}"]),
            ]
        cells.append(f"{row['peak_rss_mb']:.0f}" if "peak_rss_mb" in row else "")
        ppl = row.get("perplexity")
        cells.append(f"{ppl:.4f}" if ppl else "")
        ref = base.get("perplexity") if base else None
        cells.append(f"{(ppl / ref - 1) * 100:+.2f}%" if ppl and ref else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\n{threads} CPU thread(s) for every variant; prompts of {prompt_tokens} tokens, {new_tokens} new "
        "tokens (greedy, end-of-text suppressed); decode = tokens after the first; peak RSS of a child process "
        "that loads the variant and generates the largest batch once (runtime libraries included)."
    )
    return "\n".join(lines)
