"""Side-by-side deployment benchmark: size on disk, latency p50/p90, throughput, task quality.

Every variant runs in this one process with the same thread count, on the same real inputs
(rows of the test split), so the ratios between variants are meaningful on a noisy machine.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distilflow.deploy import ort_session
from distilflow.deploy.export import input_names, logits_module
from distilflow.losses.objective import IGNORE_INDEX

LogitsFn = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass
class Variant:
    name: str
    logits: LogitsFn
    size_bytes: int


def torch_variant(name: str, model: nn.Module, kind: str) -> Variant:
    """An eager PyTorch model; its size is that of its serialised state dict."""
    module = logits_module(model, kind).eval()
    names = input_names(kind)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return module(*(torch.from_numpy(feeds[n]) for n in names)).float().numpy()

    return Variant(name, run, buffer.getbuffer().nbytes)


def ort_variant(name: str, path: Path, threads: int, providers: list[str] | None = None) -> Variant:
    session = ort_session(path, threads, providers)

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(["logits"], feeds)[0]

    return Variant(name, run, Path(path).stat().st_size)


def _rows(data: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The first ``batch`` rows, repeated if the split has fewer."""
    n = len(next(iter(data.values())))
    index = np.arange(batch) % n
    return {k: np.ascontiguousarray(v[index]) for k, v in data.items()}


def latency_ms(fn: LogitsFn, feeds: dict[str, np.ndarray], *, iterations: int, warmup: int = 3) -> tuple[float, float]:
    """p50 and p90 wall time of one call, in milliseconds."""
    for _ in range(warmup):
        fn(feeds)
    times = []
    for _ in range(iterations):
        began = time.perf_counter()
        fn(feeds)
        times.append((time.perf_counter() - began) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def quality(fn: LogitsFn, data: dict[str, np.ndarray], kind: str, batch: int = 64) -> dict[str, float]:
    """Accuracy (classifiers) or perplexity (causal LMs) of a variant on the whole test split."""
    names = input_names(kind)
    n = len(data[names[0]])
    if kind != "causal_lm":
        correct = 0
        for start in range(0, n, batch):
            logits = fn({"x": data["x"][start : start + batch]})
            correct += int((logits.argmax(-1) == data["y"][start : start + batch]).sum())
        return {"accuracy": correct / n}
    total, count = 0.0, 0
    for start in range(0, n, batch):
        feeds = {k: data[k][start : start + batch] for k in names}
        logits = torch.from_numpy(fn(feeds)[:, :-1]).float()
        labels = torch.from_numpy(data["labels"][start : start + batch, 1:])
        total += float(
            nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        count += int((labels != IGNORE_INDEX).sum())
    return {"perplexity": math.exp(total / max(count, 1))}


def benchmark(
    variants: list[Variant],
    data: dict[str, np.ndarray],
    *,
    kind: str,
    batch_sizes: list[int],
    iterations: int,
) -> dict[str, dict[str, float]]:
    """The table: one row per variant with size, latency p50/p90 per batch size, throughput, quality."""
    names = input_names(kind)
    table = {}
    for variant in variants:
        row: dict[str, float] = {"size_bytes": variant.size_bytes}
        for batch in batch_sizes:
            feeds = _rows({k: data[k] for k in names}, batch)
            p50, p90 = latency_ms(variant.logits, feeds, iterations=iterations)
            row[f"latency_ms_b{batch}"] = round(p50, 3)
            row[f"latency_ms_p90_b{batch}"] = round(p90, 3)
            per_call = batch * (feeds[names[0]].shape[1] if kind == "causal_lm" else 1)
            row[f"throughput_b{batch}"] = round(per_call / (p50 / 1000), 1)
        row.update(quality(variant.logits, data, kind))
        table[variant.name] = row
    return table


def markdown(table: dict[str, dict[str, float]], *, kind: str, batch_sizes: list[int], threads: int) -> str:
    metric = "perplexity" if kind == "causal_lm" else "accuracy"
    unit = "tokens/s" if kind == "causal_lm" else "samples/s"
    base = table.get("torch_fp32")
    head = ["variant", "size MB", "fp32 size / size"]
    for b in batch_sizes:
        head += [f"p50 ms b{b}", f"p90 ms b{b}", f"speed-up vs torch fp32 b{b}"]
    head += [f"{unit} b{batch_sizes[-1]}", metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in table.items():
        cells = [name, f"{row['size_bytes'] / 1e6:.3f}"]
        cells.append(f"{base['size_bytes'] / row['size_bytes']:.2f}x" if base else "")
        for b in batch_sizes:
            p50 = row[f"latency_ms_b{b}"]
            cells += [f"{p50:.3f}", f"{row[f'latency_ms_p90_b{b}']:.3f}"]
            cells.append(f"{base[f'latency_ms_b{b}'] / p50:.2f}x" if base else "")
        cells += [f"{row[f'throughput_b{batch_sizes[-1]}']:.0f}", f"{row[metric]:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{threads} CPU thread(s) for every variant; latency of one call on rows of the test split.")
    return "\n".join(lines)


def teacher_student_latency(
    teacher: nn.Module,
    student: nn.Module,
    data: dict[str, np.ndarray],
    *,
    kind: str,
    batch_sizes: list[int],
    threads: int,
    iterations: int,
) -> dict:
    """The eager teacher's and student's latency per batch size, their calls interleaved (so that drift on
    a shared machine hits both alike), in ms: the median (``<role>_ms``) and the best of the repeats
    (``<role>_min_ms``), which the diagnosis compares with the MAC ratio: measured at load 10 on 2 cores,
    the median of two identical MLPs differed by up to 5x between calls, their minimum by under 5%."""
    names = input_names(kind)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {"threads": threads, "batches": {}}
    try:
        runs = {"teacher": torch_variant("teacher", teacher, kind), "student": torch_variant("student", student, kind)}
        for batch in batch_sizes:
            feeds = _rows({k: data[k] for k in names}, batch)
            times: dict[str, list[float]] = {role: [] for role in runs}
            for _ in range(3):  # warm-up
                for variant in runs.values():
                    variant.logits(feeds)
            for _ in range(iterations):
                for role, variant in runs.items():
                    began = time.perf_counter()
                    variant.logits(feeds)
                    times[role].append((time.perf_counter() - began) * 1000)
            out["batches"][str(batch)] = {
                **{f"{role}_ms": float(np.median(t)) for role, t in times.items()},
                **{f"{role}_min_ms": float(np.min(t)) for role, t in times.items()},
            }
    finally:
        torch.set_num_threads(threads_before)
    return out
