"""``distilflow size-student``: the largest student shape that meets a latency / memory budget on this machine.

Candidates (models/sizing.py: widths or channels around the configured student, no training) are
each exported with the backend the user will ship (``torch``: eager; ``ort-fp32``: deploy/export.py;
``ort-int8``: that model through deploy/quantize.py's dynamic int8), then timed on rows of the test
split at ``--batch``: a fixed thread count, a warm-up, then ``--repeats`` rounds in which every
candidate runs once (interleaved, so drift on a shared machine hits all alike). A candidate meets the
budget when its **p90** latency is within the budget less ``--margin`` (20 % by default:
size_student_choice.MARGIN; the p90 covers the spread inside one timing, the margin the spread between
timings minutes apart, which one timing cannot see) and it is within ``--max-params`` / ``--max-macs`` when
given (either may stand instead of the latency); the chosen one is the **largest** of those, by MACs per
sample, then parameters (what the student can spend). Written to ``--out``: ``student.yaml`` (the config
with the chosen ``student.model``: pass it to ``distilflow run``), ``report.md`` (every candidate: params,
MACs, p50 / p90, size on disk) and ``latency.png`` (latency against MACs, the budget drawn).

Causal-LM students (the candidates of models/sizing_lm.py, timed per generated token with the backend
shipped, including ``genai-int4``) are measured by size_student_lm.py; the choice and the outputs are
the same. ``--max-memory-mb`` is a limit on the **peak resident memory of the process that runs the
shipped model** (deploy/memory.py: a fresh child imports the backend's runtime, loads the candidate's
files and runs the timed workload once; VmHWM), runtime libraries included: what a device must have
free. It is measured only when that budget is given (one child per candidate).

A latency choice is then **confirmed alone** (``confirm_choice``): the chosen shape is built again from
its config and timed with nothing else loaded, ``--confirm`` times; a p90 over the budget less the margin
moves the choice to the next smaller candidate that met it in the sweep (the sweep's choice sits just
under that limit by construction, and the interleaved sweep is not how the shape will run).

Every timing also times a fixed reference workload (deploy/speed.py), so each measurement carries the
machine's own speed: an LM's once per round, a classifier's before and after its calls (``measure``). A
re-timing that misses the limit while that probe runs ``speed.SLOW`` times slower than in the sweep was
taken in a window where the machine itself was slow (a VM on a shared host can run at half speed for
minutes): it is taken again after a pause (``--slow-retries`` times at most, then one line), not counted
against the shape. A sweep whose probe ran that much slower than the re-timings' is named in the report:
its choice may be smaller than the budget allows.
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

from distilflow.config import Config, default_feature_layers, to_dict
from distilflow.data.classification import load_classification
from distilflow.deploy.bench import Variant, ort_variant, torch_variant
from distilflow.deploy.export import export_onnx
from distilflow.deploy.speed import median, probe_ms
from distilflow.errors import UserError
from distilflow.models.sizing import SUPPORTED_ARCHS, Candidate, candidates
from distilflow.size_student_choice import (
    MARGIN,
    Timing,
    budget_words,
    choose,
    confirm_choice,
    per,
    speed_summary,
)

BACKENDS = ("ort-int8", "ort-fp32", "torch", "genai-int4")
WARMUP = 3
PROBES = 5  # speed probes before and after a classifier timing (``measure``)


def require_backend(backend: str, kind: str) -> None:
    """One line when ``backend`` is unknown, its package is missing, or it does not fit the model kind."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "genai-int4":
        from distilflow.deploy.genai import require_genai

        require_genai()
        if kind != "causal_lm":
            raise UserError(
                "--backend genai-int4 builds causal LMs; for a classifier student use ort-int8, ort-fp32 or torch"
            )
    if backend.startswith("ort"):
        try:
            import onnxruntime  # noqa: F401

            if backend == "ort-int8":
                import onnxruntime.quantization  # noqa: F401
        except ImportError:
            raise UserError(f"--backend {backend} needs onnxruntime: pip install onnxruntime") from None


def variant(c: Candidate, backend: str, folder: Path, example: torch.Tensor, threads: int) -> Variant:
    """The candidate as ``backend`` ships it; its files stay in ``folder`` (a memory child loads them)."""
    stem = folder / str(len(list(folder.iterdir())))
    if backend == "torch":
        from safetensors.torch import save_file

        save_file(c.module.state_dict(), f"{stem}.safetensors")
        c.path = Path(f"{stem}.safetensors")
        return torch_variant(c.name, c.module, "classifier")
    onnx = export_onnx(c.module, {"x": example}, Path(f"{stem}.onnx"), kind="classifier")
    if backend == "ort-int8":
        from distilflow.deploy.quantize import ort_dynamic

        onnx = ort_dynamic(onnx, onnx.with_suffix(".int8.onnx"))
    c.path = onnx
    return ort_variant(c.name, onnx, threads)


def memory_spec(c: Candidate, backend: str, threads: int, batch: int, input_shape: tuple, classes: int) -> dict:
    """How deploy/memory.py's child loads and runs a classifier candidate (``variant`` wrote its file)."""
    kind = "torch-classifier" if backend == "torch" else "ort"
    return {
        "kind": kind,
        "path": str(c.path),
        "threads": threads,
        "batch": batch,
        "input_shape": list(input_shape),
        "num_classes": classes,
        "model": c.model,
    }


def parse_widths(text: str | None, flag: str = "--widths") -> list[int] | None:
    """``--widths 32,64,128`` -> [32, 64, 128] (also ``--depths``); None -> the built-in grid."""
    if not text:
        return None
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 32,64,128") from None
    if min(widths) < 1:
        raise UserError(f"{flag} {text!r}: every value must be >= 1")
    return widths


def summary_line(result: dict[str, Any], out: Path) -> str:
    c = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    memory = f", peak RSS {c['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in c else ""
    tried = result.get("confirmed") or []
    alone = f"; alone p90 {', '.join(f'{p:.3f}' for p in tried[-1]['p90_ms'])} ms" if tried else ""
    missed = f" ({len(tried) - 1} larger missed it alone)" if len(tried) > 1 else ""
    return (
        f"chosen {c['name']}{missed}: {c['params']:,} params, {c['macs']:,} MACs{per(result['budget'])}, p50 "
        f"{c['p50_ms']:.3f} ms, p90 {c['p90_ms']:.3f} ms{alone}{memory} ({budget_words(result['budget'])}); "
        f"{len(result['candidates'])} candidates in {out / 'report.md'}; run it: distilflow run {out / 'student.yaml'}"
    )


def measure(
    variants: list[Variant], feeds: dict[str, np.ndarray], *, repeats: int, probe: list[float] | None = None
) -> list[list[float]]:
    """Per variant its ``repeats`` call times (ms), the variants interleaved round by round, each timed call
    right after an untimed one of the same variant (as a deployed model is called: again and again); when
    ``probe`` is given, ``PROBES`` speed probes (ms) are appended to it before the warm-up and as many after
    the last round. Whatever ran just before a call evicts what it needs: a small model timed right after
    each probe ran 1.4-2.5x slower, and right after the largest candidate up to 3.8x slower
    (docs/BENCHMARKS.md, "Student sizing, session 9: what ran before a timed call")."""
    if probe is not None:
        probe.extend(probe_ms() for _ in range(PROBES))
    for variant in variants:
        for _ in range(WARMUP):
            variant.logits(feeds)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):
        for i, variant in enumerate(variants):
            variant.logits(feeds)
            began = time.perf_counter()
            variant.logits(feeds)
            times[i].append((time.perf_counter() - began) * 1000)
    if probe is not None:
        probe.extend(probe_ms() for _ in range(PROBES))
    return times


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


def check_inputs(
    cfg: Config,
    backend: str,
    limits: dict[str, Any],
    batch: int,
    repeats: int,
    threads: int,
    confirm: int = 0,
    slow_retries: int = 0,
    margin: float = 0.0,
) -> str:
    """The model kind (``classifier`` / ``causal_lm``), or one line for what size-student cannot take."""
    kind = "causal_lm" if cfg.task == "causal_lm" else "classifier"
    arch = cfg.student.model.arch
    if kind == "classifier" and arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"size-student sizes built-in classifier students ({', '.join(SUPPORTED_ARCHS)}) and Hugging Face "
            f"causal LMs (arch hf); student.model.arch is {arch!r}"
        )
    require_backend(backend, kind)
    if all(v is None for v in limits.values()):
        raise UserError("give a budget: --latency-ms, --max-params, --max-macs or --max-memory-mb (any together)")
    counts_bad = min(batch, threads) < 1 or repeats < 5 or min(confirm, slow_retries) < 0
    if any(v is not None and v <= 0 for v in limits.values()) or counts_bad or not 0 <= margin < 1:
        raise UserError(
            "--latency-ms, --max-params, --max-macs and --max-memory-mb must be > 0, --batch >= 1, --repeats >= 5, "
            "--threads >= 1, --confirm >= 0, --slow-retries >= 0 and 0 <= --margin < 1 (a share of the latency "
            "budget: 0.2 keeps 20 % free)"
        )
    return kind


def size_student(
    cfg: Config,
    *,
    latency_ms: float | None,
    batch: int,
    backend: str,
    out: Path,
    max_params: int | None = None,
    max_macs: int | None = None,
    max_memory_mb: float | None = None,
    threads: int = 1,
    repeats: int = 30,
    widths: list[int] | None = None,
    depths: list[int] | None = None,
    confirm: int = 3,
    slow_retries: int = 3,
    margin: float = MARGIN,
) -> dict[str, Any]:
    """Measure the candidates, choose (p90 within ``latency_ms`` less ``margin``; a latency choice re-timed
    alone ``confirm`` times), write ``out``/{student.yaml, report.md, latency.png, sizing.json}."""
    limits = {"latency_ms": latency_ms, "max_params": max_params, "max_macs": max_macs, "max_memory_mb": max_memory_mb}
    kind = check_inputs(cfg, backend, limits, batch, repeats, threads, confirm, slow_retries, margin)
    measured = {"backend": backend, "batch": batch, "threads": threads, "repeats": repeats, "widths": widths}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    budget = {**limits, "batch": batch, "backend": backend, "threads": threads, "kind": kind, "margin": margin}
    if kind == "causal_lm":
        g = cfg.deploy.genai
        budget.update(prompt_tokens=g.prompt_tokens, new_tokens=g.new_tokens)
    try:
        if kind == "causal_lm":
            from distilflow.size_student_lm import LMSizing

            sizing: Any = LMSizing(cfg, **measured, depths=depths)
        else:
            if depths:
                raise UserError("--depths applies to causal-LM students; an MLP / CNN keeps its depth and one less")
            sizing = ClassifierSizing(cfg, **measured)
        rows = sizing.rows(memory=max_memory_mb is not None)
        load = os.getloadavg()[0]  # a shared machine's other work widens the spread: said in the report
        chosen, confirmed = choose(rows, budget), []
        if confirm and latency_ms is not None:
            reference = median(sizing.sweep_probe)
            chosen, confirmed = confirm_choice(
                rows, budget, sizing.retime, confirm, reference, slow_retries=slow_retries
            )
    finally:
        torch.set_num_threads(before)
    result = {
        "budget": budget,
        "repeats": repeats,
        "load_average": load,
        "chosen": chosen["name"],
        "confirmed": confirmed,  # the candidates re-timed alone, largest first: their p90s and whether they held
        "speed_probe": speed_summary(sizing.sweep_probe, confirmed),
        "candidates": rows,  # ordered by MACs, then parameters
    }
    from distilflow.size_student_report import write_outputs

    write_outputs(out, sized_config(cfg, chosen["model"]), chosen, result)
    return result


class ClassifierSizing:
    """The MLP / CNN candidates of one config, each timed as ``backend`` ships it: one call at ``batch``
    rows of the test split; :meth:`retime` builds one of them again from its config and times it alone.
    The sweep's speed probe samples (one per round, deploy/speed.py) are kept in ``sweep_probe``."""

    def __init__(
        self, cfg: Config, *, backend: str, batch: int, threads: int, repeats: int, widths: list[int] | None
    ) -> None:
        self.cfg, self.backend, self.threads, self.repeats, self.widths = cfg, backend, threads, repeats, widths
        self.data = load_classification(cfg.data)
        rows_index = np.arange(batch) % len(self.data.test_x)
        self.feeds = {"x": np.ascontiguousarray(self.data.test_x.numpy()[rows_index])}
        self.batch = batch
        self.sweep_probe: list[float] = []

    def rows(self, *, memory: bool) -> list[dict[str, Any]]:
        """One measured row per candidate (ordered by MACs, then parameters), the candidates interleaved."""
        from distilflow.deploy.memory import peak_memory_mb

        data = self.data
        model_tree = to_dict(self.cfg)["student"]["model"]
        found = candidates(model_tree, data.input_shape, data.num_classes, widths=self.widths)
        with tempfile.TemporaryDirectory() as tmp:
            variants = [variant(c, self.backend, Path(tmp), data.test_x[:2], self.threads) for c in found]
            times = measure(variants, self.feeds, repeats=self.repeats, probe=self.sweep_probe)
            specs = [
                memory_spec(c, self.backend, self.threads, self.batch, data.input_shape, data.num_classes)
                for c in found
            ]
            peaks = [peak_memory_mb(spec) if memory else {} for spec in specs]
        return [
            {
                "name": c.name,
                "model": c.model,
                "params": c.params,
                "macs": c.macs,
                "p50_ms": float(np.percentile(t, 50)),
                "p90_ms": float(np.percentile(t, 90)),
                "size_bytes": v.size_bytes,
                **peak,
            }
            for c, v, t, peak in zip(found, variants, times, peaks)
        ]

    def retime(self, row: dict[str, Any]) -> Timing:
        """``row``'s shape built and exported again, timed alone (as it will be deployed)."""
        data = self.data
        section = row["model"].get("mlp") or row["model"].get("cnn")
        widths = [max(section.get("hidden") or section.get("channels"))]
        found = candidates(row["model"], data.input_shape, data.num_classes, widths=widths)
        (c,) = [c for c in found if c.name == row["name"]]
        with tempfile.TemporaryDirectory() as tmp:
            v = variant(c, self.backend, Path(tmp), data.test_x[:2], self.threads)
            probe: list[float] = []
            (times,) = measure([v], self.feeds, repeats=self.repeats, probe=probe)
        return Timing(float(np.percentile(times, 50)), float(np.percentile(times, 90)), median(probe))
