"""``distilflow size-student``: the largest student shape that meets a latency budget on this machine.

Candidates (models/sizing.py: widths or channels around the configured student, no training) are
each exported with the backend the user will ship (``torch``: eager; ``ort-fp32``: deploy/export.py;
``ort-int8``: that model through deploy/quantize.py's dynamic int8), then timed on rows of the test
split at ``--batch``: a fixed thread count, a warm-up, then ``--repeats`` rounds in which every
candidate runs once (interleaved, so drift on a shared machine hits all alike). A candidate meets the
budget when its **p90** latency does (the p90 is the safety margin: its spread over the repeats, not a
fixed factor) and it is within ``--max-params`` / ``--max-macs`` when given (either may stand instead of
the latency); the chosen one is the **largest** of those, by MACs per sample, then parameters (what
the student can spend). Written to ``--out``: ``student.yaml`` (the config with the chosen
``student.model``: pass it to ``distilflow run``), ``report.md`` (every candidate: params, MACs, p50 /
p90, size on disk) and ``latency.png`` (latency against MACs, the budget drawn).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from distilflow.config import Config, default_feature_layers, to_dict
from distilflow.data.classification import load_classification
from distilflow.deploy.bench import Variant, ort_variant, torch_variant
from distilflow.deploy.export import export_onnx
from distilflow.errors import UserError
from distilflow.models.sizing import SUPPORTED_ARCHS, Candidate, candidates

BACKENDS = ("ort-int8", "ort-fp32", "torch", "genai-int4")
WARMUP = 3


def require_backend(backend: str, kind: str) -> None:
    """One line when ``backend`` is unknown, its package is missing, or it does not fit the model kind."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "genai-int4":
        from distilflow.deploy.genai import require_genai

        require_genai()
        raise UserError(
            "--backend genai-int4 builds causal LMs; size-student sizes classifier students (mlp, cnn1d, cnn2d) "
            "today: use ort-int8, ort-fp32 or torch"
        )
    if backend.startswith("ort"):
        try:
            import onnxruntime  # noqa: F401

            if backend == "ort-int8":
                import onnxruntime.quantization  # noqa: F401
        except ImportError:
            raise UserError(f"--backend {backend} needs onnxruntime: pip install onnxruntime") from None


def variant(c: Candidate, backend: str, folder: Path, example: torch.Tensor, threads: int) -> Variant:
    if backend == "torch":
        return torch_variant(c.name, c.module, "classifier")
    onnx = export_onnx(c.module, {"x": example}, folder / f"{len(list(folder.iterdir()))}.onnx", kind="classifier")
    if backend == "ort-int8":
        from distilflow.deploy.quantize import ort_dynamic

        onnx = ort_dynamic(onnx, onnx.with_suffix(".int8.onnx"))
    return ort_variant(c.name, onnx, threads)


def parse_widths(text: str | None) -> list[int] | None:
    """``--widths 32,64,128`` -> [32, 64, 128]; None -> the built-in grid."""
    if not text:
        return None
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--widths {text!r}: give comma-separated whole numbers, e.g. 32,64,128") from None
    if min(widths) < 1:
        raise UserError(f"--widths {text!r}: every width must be >= 1")
    return widths


def summary_line(result: dict[str, Any], out: Path) -> str:
    c = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    return (
        f"chosen {c['name']}: {c['params']:,} params, {c['macs']:,} MACs, p50 {c['p50_ms']:.3f} ms, p90 "
        f"{c['p90_ms']:.3f} ms ({budget_words(result['budget'])}); {len(result['candidates'])} candidates "
        f"in {out / 'report.md'}; run it: distilflow run {out / 'student.yaml'}"
    )


def measure(variants: list[Variant], feeds: dict[str, np.ndarray], *, repeats: int) -> list[list[float]]:
    """Per variant its ``repeats`` call times (ms), the variants interleaved round by round."""
    for variant in variants:
        for _ in range(WARMUP):
            variant.logits(feeds)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for i, variant in enumerate(variants):
            began = time.perf_counter()
            variant.logits(feeds)
            times[i].append((time.perf_counter() - began) * 1000)
    return times


def budget_words(budget: dict[str, Any]) -> str:
    """``p90 <= 0.3 ms at batch 256 with ort-int8, <= 50,000 params``: the limits that were given."""
    words = []
    if budget.get("latency_ms") is not None:
        words.append(f"p90 <= {budget['latency_ms']:g} ms at batch {budget['batch']} with {budget['backend']}")
    if budget.get("max_params") is not None:
        words.append(f"<= {budget['max_params']:,} params")
    if budget.get("max_macs") is not None:
        words.append(f"<= {budget['max_macs']:,} MACs per sample")
    return ", ".join(words)


def fits(row: dict[str, Any], budget: dict[str, Any]) -> bool:
    """Whether a measured candidate meets every limit given (latency by its p90: the measured spread is the margin)."""
    return (
        (budget.get("latency_ms") is None or row["p90_ms"] <= budget["latency_ms"])
        and (budget.get("max_params") is None or row["params"] <= budget["max_params"])
        and (budget.get("max_macs") is None or row["macs"] <= budget["max_macs"])
    )


def choose(rows: list[dict[str, Any]], budget: dict[str, Any]) -> dict[str, Any]:
    """The largest row (MACs, then params) that fits ``budget``; none: one line naming the smallest
    candidate (the fastest, for a latency budget) and what it measured."""
    meeting = [r for r in rows if fits(r, budget)]
    if not meeting:
        if budget.get("latency_ms") is not None:
            best = min(rows, key=lambda r: r["p90_ms"])
            what = f"the fastest, {best['name']}, takes {best['p50_ms']:.3g} ms (p90 {best['p90_ms']:.3g})"
        else:
            best = min(rows, key=lambda r: (r["macs"], r["params"]))
            what = f"the smallest, {best['name']}, has {best['params']:,} params and {best['macs']:,} MACs"
        raise UserError(f"no candidate meets {budget_words(budget)}: {what}; raise the budget or give smaller --widths")
    return max(meeting, key=lambda r: (r["macs"], r["params"]))


def sized_config(cfg: Config, model: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as a tree with ``student.model`` replaced; default feature layers are left to be resolved
    again (they name the student's last hidden layer, which moves with its depth)."""
    tree = to_dict(cfg)
    unset = dataclasses.replace(cfg.distill, feature_layers=None)
    defaults = default_feature_layers(dataclasses.replace(cfg, distill=unset))
    if cfg.distill.feature_layers == defaults:
        tree["distill"]["feature_layers"] = None
    tree["student"]["model"] = {"checkpoint": None, **model}
    tree["output_dir"] = None
    return tree


def size_student(
    cfg: Config,
    *,
    latency_ms: float | None,
    batch: int,
    backend: str,
    out: Path,
    max_params: int | None = None,
    max_macs: int | None = None,
    threads: int = 1,
    repeats: int = 30,
    widths: list[int] | None = None,
) -> dict[str, Any]:
    """Measure the candidates, choose, write ``out``/{student.yaml, report.md, latency.png, sizing.json}."""
    arch = cfg.student.model.arch
    if arch not in SUPPORTED_ARCHS or cfg.task == "causal_lm":
        raise UserError(
            f"size-student sizes built-in classifier students ({', '.join(SUPPORTED_ARCHS)}); student.model.arch "
            f"is {arch!r}"
        )
    require_backend(backend, "classifier")
    limits = {"latency_ms": latency_ms, "max_params": max_params, "max_macs": max_macs}
    if all(v is None for v in limits.values()):
        raise UserError("give a budget: --latency-ms, --max-params or --max-macs (any together)")
    if any(v is not None and v <= 0 for v in limits.values()) or batch < 1 or repeats < 5 or threads < 1:
        raise UserError(
            "--latency-ms, --max-params and --max-macs must be > 0, --batch >= 1, --repeats >= 5 and --threads >= 1"
        )
    data = load_classification(cfg.data)
    model_tree = to_dict(cfg)["student"]["model"]
    found = candidates(model_tree, data.input_shape, data.num_classes, widths=widths)
    rows_index = np.arange(batch) % len(data.test_x)
    feeds = {"x": np.ascontiguousarray(data.test_x.numpy()[rows_index])}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            variants = [variant(c, backend, Path(tmp), data.test_x[:2], threads) for c in found]
            times = measure(variants, feeds, repeats=repeats)
    finally:
        torch.set_num_threads(before)
    rows = [
        {
            "name": c.name,
            "model": c.model,
            "params": c.params,
            "macs": c.macs,
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "size_bytes": v.size_bytes,
        }
        for c, v, t in zip(found, variants, times)
    ]
    budget = {**limits, "batch": batch, "backend": backend, "threads": threads}
    chosen = choose(rows, budget)
    result = {
        "budget": budget,
        "repeats": repeats,
        "load_average": os.getloadavg()[0],  # a shared machine's other work widens the spread: said in the report
        "chosen": chosen["name"],
        "candidates": rows,  # ordered by MACs, then parameters
    }
    write_outputs(out, cfg, chosen, result)
    return result


def write_outputs(out: Path, cfg: Config, chosen: dict[str, Any], result: dict[str, Any]) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    b = result["budget"]
    header = (
        f"# distilflow size-student: the largest candidate that meets {budget_words(b)} ({b['threads']} thread(s)) "
        f"on this machine: {chosen['name']}.\n"
        "# Pass it to 'distilflow run' (this file is your config with student.model replaced).\n"
    )
    (out / "student.yaml").write_text(header + yaml.safe_dump(sized_config(cfg, chosen["model"]), sort_keys=False))
    (out / "sizing.json").write_text(json.dumps(result, indent=2))
    plot_latency(result, out / "latency.png")
    (out / "report.md").write_text("\n".join(report_lines(result)) + "\n")


def report_lines(result: dict[str, Any]) -> list[str]:
    b = result["budget"]
    lines = [
        "# Student sizing",
        "",
        f"Budget: {budget_words(b)}; latency of one call at batch {b['batch']}, backend {b['backend']}, "
        f"{b['threads']} thread(s); {result['repeats']} interleaved repeats per candidate; load average "
        f"{result['load_average']:.1f} when measured. Chosen: "
        f"**{result['chosen']}** (most MACs among those that meet it).",
        "",
        "| candidate | params | MACs / sample | p50 ms | p90 ms | size on disk (KiB) | meets |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["candidates"]:
        mark = "**chosen**" if r["name"] == result["chosen"] else ("yes" if fits(r, b) else "no")
        lines.append(
            f"| {r['name']} | {r['params']:,} | {r['macs']:,} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['size_bytes'] / 1024:.1f} | {mark} |"
        )
    return [*lines, "", "![latency against MACs](latency.png)"]


def plot_latency(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, b = result["candidates"], result["budget"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for depth in sorted({len(_shape(r)) for r in rows}):
        part = [r for r in rows if len(_shape(r)) == depth]
        ax.errorbar(
            [r["macs"] for r in part],
            [r["p50_ms"] for r in part],
            yerr=[[0] * len(part), [r["p90_ms"] - r["p50_ms"] for r in part]],
            marker="o",
            ms=3,
            lw=1,
            capsize=2,
            label=f"{depth} layer(s): p50, bar to p90",
        )
    chosen = next(r for r in rows if r["name"] == result["chosen"])
    ax.plot([chosen["macs"]], [chosen["p50_ms"]], "r*", ms=12, label=f"chosen: {chosen['name']}")
    if b.get("latency_ms") is not None:
        ax.axhline(b["latency_ms"], color="#c44e52", ls="--", lw=0.8, label="budget")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MACs per sample")
    ax.set_ylabel(f"ms per call (batch {b['batch']}, {b['backend']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shape(row: dict[str, Any]) -> list[int]:
    section = row["model"].get("mlp") or row["model"].get("cnn")
    return section.get("hidden") or section.get("channels")
