"""The deploy stage: export the student, quantize it as configured, benchmark every variant.

Writes into ``<run_dir>/deploy/``: ``student.onnx`` (+ int8 variants), ``bench.json``,
``bench.md``, and for language models the tokenizer beside the ONNX files so that
``distilflow predict`` needs nothing else. Each ONNX file is written atomically; a full disk is one
line naming the file or the folder (distilflow/storage.py). The stage is not resumed but redone:
``run`` writes results.json after it, so a run killed here deploys again when it is resumed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distilflow.config import DeployConfig
from distilflow.deploy.bench import benchmark, markdown, ort_variant, torch_variant
from distilflow.deploy.export import Parity, check_parity, export_onnx, logits_module
from distilflow.deploy.genai import MANIFEST
from distilflow.deploy.int8_kernels import decision, describe, kernel_report
from distilflow.deploy.quantize import ort_dynamic, ort_static, quantized_summary, strip_metadata, torch_int8
from distilflow.errors import UserError
from distilflow.storage import remove_stale_temps, writes_into
from distilflow.train.checkpoint import write_json, write_text
from distilflow.workload import Workload


def tensorrt_status() -> str | None:
    """None when ONNX Runtime's TensorRT provider can run here, else one line saying why not."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "TensorRT: skipped, this onnxruntime build has no TensorrtExecutionProvider (needs onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "TensorRT: skipped, no CUDA GPU on this machine"
    return None


def _genai_source(work: Workload, student: nn.Module, cfg: DeployConfig, out: Path) -> Path | None:
    """The student as a Hugging Face folder for ONNX Runtime GenAI's builder, or None when it does not
    apply (a classifier, deploy.genai off) or cannot (unsupported architecture: said in one line)."""
    if work.kind != "causal_lm" or not cfg.genai.enabled:
        return None
    from distilflow.deploy.genai import read_hf_config, require_genai, unsupported_reason
    from distilflow.models.hf import no_progress_bars

    require_genai()
    hf_dir = out / "student-hf"
    with no_progress_bars():
        student.float().cpu().eval().save_pretrained(hf_dir)
    work.save_for_inference(hf_dir)
    reason = unsupported_reason(read_hf_config(hf_dir), cfg.genai.execution_provider)
    if reason:
        print(f"distilflow: {reason}; exporting with the full-sequence torch.export path instead", file=sys.stderr)
        return None
    return hf_dir


def _genai_parity(student: nn.Module, folder: Path, work: Workload, cfg: DeployConfig) -> Parity:
    """The GenAI decoder's logits (empty KV cache) against the eager student's on 8 held-out rows."""
    from distilflow.deploy.genai import logits_function

    data = {k: v[:8] for k, v in work.test_arrays().items()}
    got = logits_function(folder, cfg.threads)(data)
    with torch.no_grad():
        want = logits_module(student, "causal_lm")(
            *(torch.from_numpy(data[k]) for k in ("input_ids", "attention_mask"))
        )
    diff = np.abs(got - want.float().numpy())
    parity = Parity(float(diff.max()), float(diff.max() / max(float(want.abs().max()), 1e-12)))
    if not parity.max_rel <= cfg.parity_tolerance:
        raise UserError(f"ONNX Runtime GenAI model does not match the eager model: {parity}")
    return parity


@writes_into("out")
def export_student(work: Workload, student: nn.Module, cfg: DeployConfig, out: Path) -> tuple[Path, Any]:
    """``out/student.onnx`` and its parity with the eager student on real test inputs; with
    ``deploy.genai.enabled`` (causal LMs) ``out/genai-fp32/model.onnx`` instead."""
    kind = work.kind
    remove_stale_temps(out)  # of an ONNX write that a kill cut short
    hf_dir = _genai_source(work, student, cfg, out)
    if hf_dir is not None:
        from distilflow.deploy.genai import build

        folder = build(hf_dir, out / "genai-fp32", "fp32", cfg.genai)
        return folder / "model.onnx", _genai_parity(student.float().cpu().eval(), folder, work, cfg)
    student = student.float().cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    data = work.test_arrays()
    example = {k: torch.from_numpy(v[:2]) for k, v in data.items()}
    onnx_path = export_onnx(student, example, out / "student.onnx", kind=kind)
    parity_inputs = {k: torch.from_numpy(v[:8]) for k, v in data.items()}
    parity = check_parity(student, onnx_path, parity_inputs, kind=kind, tolerance=cfg.parity_tolerance)
    work.save_for_inference(out)
    return onnx_path, parity


@writes_into("out")
def quantize_student(work: Workload, onnx_path: Path, cfg: DeployConfig, out: Path) -> dict[str, Path]:
    """The int8 ONNX files asked for by ``deploy.methods``, by variant name; for a GenAI export (see
    :func:`export_student`) the int8/int4 GenAI models of ``deploy.genai.precisions``."""
    if onnx_path.parent.name == "genai-fp32" and (onnx_path.parent / "genai_config.json").is_file():
        from distilflow.deploy.genai import build

        hf_dir = out / "student-hf"
        wanted = [p for p in cfg.genai.precisions if p != "fp32"]
        return {f"genai_{p}": build(hf_dir, out / f"genai-{p}", p, cfg.genai) / "model.onnx" for p in wanted}
    common = {
        "per_channel": cfg.per_channel,
        "reduce_range": cfg.reduce_range,
        "op_types": cfg.op_types or None,
        "exclude": cfg.exclude,
    }
    paths = {}
    if "dynamic" in cfg.methods:
        paths["ort_int8_dynamic"] = ort_dynamic(onnx_path, out / "student.int8-dynamic.onnx", **common)
    if "static" in cfg.methods:
        calibration = work.calibration_feeds(cfg.observe_steps, cfg.calibration_batch)
        paths["ort_int8_static"] = ort_static(onnx_path, out / "student.int8-static.onnx", calibration, **common)
    for path in (onnx_path, *paths.values()):
        strip_metadata(path)
    return paths


@writes_into("out")
def deploy(work: Workload, student: nn.Module, cfg: DeployConfig, out: Path) -> dict[str, Any]:
    """Export, quantize and benchmark ``student``; returns what goes into results.json."""
    kind = work.kind
    hf_dir = _genai_source(work, student, cfg, out)
    if hf_dir is not None:
        return deploy_genai(work, student, cfg, out, hf_dir)
    onnx_path, parity = export_student(work, student, cfg, out)
    student = student.float().cpu().eval()
    quantized = quantize_student(work, onnx_path, cfg, out)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        variants = [torch_variant("torch_fp32", student, kind), ort_variant("ort_fp32", onnx_path, cfg.threads)]
        variants += [ort_variant(name, path, cfg.threads) for name, path in quantized.items()]
        backend = None
        if cfg.torch_backend != "off":
            model, backend = torch_int8(student, backend=cfg.torch_backend)
            variants.append(torch_variant("torch_int8", model, kind))
        notes = []
        if cfg.tensorrt:
            status = tensorrt_status()
            if status is None:
                providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
                variants.append(ort_variant("ort_tensorrt", onnx_path, cfg.threads, providers))
            else:
                notes.append(status)
        table = benchmark(
            variants, work.test_arrays(), kind=kind, batch_sizes=cfg.batch_sizes, iterations=cfg.iterations
        )
    finally:
        torch.set_num_threads(threads_before)
    kernels = decision(cfg.reduce_range)
    text = markdown(table, kind=kind, batch_sizes=cfg.batch_sizes, threads=cfg.threads) + "\n" + describe(kernels)
    info = {
        "variants": table,
        "parity": {"max_abs": parity.max_abs, "max_rel": parity.max_rel},
        "quantized_nodes": {"ort_fp32": quantized_summary(onnx_path)}
        | {name: quantized_summary(path) for name, path in quantized.items()},
        "excluded_from_quantization": cfg.exclude,
        "per_channel": cfg.per_channel,
        "int8_kernels": kernels,
        "torch_int8_backend": backend,
        "threads": cfg.threads,
        "notes": notes,
        "table_markdown": text,
    }
    write_json(out / "bench.json", info)
    write_text(out / "bench.md", text + "\n" + "".join(f"\n{n}" for n in notes) + "\n")
    return info


@writes_into("out")
def deploy_genai(work: Workload, student: nn.Module, cfg: DeployConfig, out: Path, hf_dir: Path) -> dict[str, Any]:
    """Causal LMs through ONNX Runtime GenAI: build every precision, then the generation benchmark
    (eager transformers ``generate`` vs each GenAI variant, docs in :mod:`distilflow.deploy.lm_bench`)."""
    from distilflow.deploy import lm_bench
    from distilflow.deploy.genai import build, read_genai_config

    g = cfg.genai
    folders = {p: build(hf_dir, out / f"genai-{p}", p, g) for p in g.precisions}
    student = student.float().cpu().eval()
    parity = _genai_parity(student, folders["fp32"], work, cfg) if "fp32" in folders else None
    positions = read_genai_config(next(iter(folders.values())))["model"]["context_length"]
    if g.prompt_tokens + g.new_tokens > positions:
        raise UserError(
            f"deploy.genai.prompt_tokens + new_tokens = {g.prompt_tokens + g.new_tokens} exceeds the model's "
            f"{positions} positions; lower one of them"
        )
    data = work.test_arrays()
    if data["input_ids"].shape[1] < g.prompt_tokens:
        raise UserError(
            f"deploy.genai.prompt_tokens {g.prompt_tokens} is longer than the held-out rows "
            f"({data['input_ids'].shape[1]} tokens, the data section's seq_len); lower it"
        )
    prompts = {b: lm_bench.prompt_rows(data, b, g.prompt_tokens) for b in lm_bench.BATCH_SIZES}
    threads_before = torch.get_num_threads()
    try:
        variants = [lm_bench.torch_variant("torch_eager", hf_dir, cfg.threads)]
        variants += [lm_bench.genai_variant(f"genai_{p}", folder, cfg.threads) for p, folder in folders.items()]
        table = lm_bench.benchmark_generation(
            variants, data, prompts=prompts, new_tokens=g.new_tokens, repeats=g.repeats
        )
    finally:
        torch.set_num_threads(threads_before)
    text = lm_bench.markdown(table, threads=cfg.threads, new_tokens=g.new_tokens, prompt_tokens=g.prompt_tokens)
    manifests = {f"genai_{p}": json.loads((folder / MANIFEST).read_text()) for p, folder in folders.items()}
    info = {
        "variants": table,
        "genai": manifests,
        "parity": {"max_abs": parity.max_abs, "max_rel": parity.max_rel} if parity else None,
        "cpu": kernel_report(),  # what the GenAI int8/int4 kernels ran on (MatMulNBits; no reduce_range there)
        "threads": cfg.threads,
        "notes": [],
        "table_markdown": text,
    }
    write_json(out / "bench.json", info)
    write_text(out / "bench.md", text + "\n")
    return info


def genai_report_lines(info: dict[str, Any]) -> list[str]:
    """The report's deployment section for a causal LM shipped through ONNX Runtime GenAI."""
    lines = ["## Deployment for generation (ONNX Runtime GenAI)", "", info["table_markdown"], ""]
    if info.get("parity"):
        p = info["parity"]
        lines += [
            f"GenAI fp32 logits vs the eager student: max abs diff {p['max_abs']:.3g}, relative {p['max_rel']:.3g}.",
            "",
        ]
    for name, m in info["genai"].items():
        ops = "; ".join(f"{op} {bits}" for op, bits in m["quantized_ops"].items()) or "none"
        floats = ", ".join(m["float_matrices"]) or "none"
        lines.append(f"- {name}: quantized ops {ops}; float weight matrices: {floats}")
    return [*lines, "", *info["notes"], ""]
