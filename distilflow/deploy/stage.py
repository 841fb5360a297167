"""The deploy stage: export the student, quantize it as configured, benchmark every variant.

Writes into ``<run_dir>/deploy/``: ``student.onnx`` (+ int8 variants), ``bench.json``,
``bench.md``, and for language models the tokenizer beside the ONNX files so that
``distilflow predict`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distilflow.config import DeployConfig
from distilflow.deploy.bench import benchmark, markdown, ort_variant, torch_variant
from distilflow.deploy.export import check_parity, export_onnx
from distilflow.deploy.quantize import ort_dynamic, ort_static, quantized_summary, strip_metadata, torch_int8
from distilflow.train.checkpoint import write_json, write_text


def tensorrt_status() -> str | None:
    """None when ONNX Runtime's TensorRT provider can run here, else one line saying why not."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "TensorRT: skipped, this onnxruntime build has no TensorrtExecutionProvider (needs onnxruntime-gpu)"
    if not torch.cuda.is_available():
        return "TensorRT: skipped, no CUDA GPU on this machine"
    return None


def _kind(work: Any) -> str:
    return "causal_lm" if work.per_token else "classifier"


def export_student(work: Any, student: nn.Module, cfg: DeployConfig, out: Path) -> tuple[Path, Any]:
    """``out/student.onnx`` and its parity with the eager student on real test inputs."""
    kind = _kind(work)
    student = student.float().cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    data = work.test_arrays()
    example = {k: torch.from_numpy(v[:2]) for k, v in data.items()}
    onnx_path = export_onnx(student, example, out / "student.onnx", kind=kind)
    parity_inputs = {k: torch.from_numpy(v[:8]) for k, v in data.items()}
    parity = check_parity(student, onnx_path, parity_inputs, kind=kind, tolerance=cfg.parity_tolerance)
    work.save_for_inference(out)
    return onnx_path, parity


def quantize_student(work: Any, onnx_path: Path, cfg: DeployConfig, out: Path) -> dict[str, Path]:
    """The int8 ONNX files asked for by ``deploy.methods``, by variant name."""
    common = {"per_channel": cfg.per_channel, "op_types": cfg.op_types or None, "exclude": cfg.exclude}
    paths = {}
    if "dynamic" in cfg.methods:
        paths["ort_int8_dynamic"] = ort_dynamic(onnx_path, out / "student.int8-dynamic.onnx", **common)
    if "static" in cfg.methods:
        calibration = work.calibration_feeds(cfg.observe_steps, cfg.calibration_batch)
        paths["ort_int8_static"] = ort_static(onnx_path, out / "student.int8-static.onnx", calibration, **common)
    for path in (onnx_path, *paths.values()):
        strip_metadata(path)
    return paths


def deploy(work: Any, student: nn.Module, cfg: DeployConfig, out: Path) -> dict[str, Any]:
    """Export, quantize and benchmark ``student``; returns what goes into results.json."""
    kind = _kind(work)
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
    text = markdown(table, kind=kind, batch_sizes=cfg.batch_sizes, threads=cfg.threads)
    info = {
        "variants": table,
        "parity": {"max_abs": parity.max_abs, "max_rel": parity.max_rel},
        "quantized_nodes": {"ort_fp32": quantized_summary(onnx_path)}
        | {name: quantized_summary(path) for name, path in quantized.items()},
        "excluded_from_quantization": cfg.exclude,
        "per_channel": cfg.per_channel,
        "torch_int8_backend": backend,
        "threads": cfg.threads,
        "notes": notes,
        "table_markdown": text,
    }
    write_json(out / "bench.json", info)
    write_text(out / "bench.md", text + "\n" + "".join(f"\n{n}" for n in notes) + "\n")
    return info
