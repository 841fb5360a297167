"""Config sections of shipping the student: ONNX export, int8 quantization, the benchmark, GenAI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distilflow.typed_config import help_field

_f = help_field


@dataclass
class GenaiConfig:
    enabled: bool = _f(
        False,
        "Causal LMs: ship through ONNX Runtime GenAI's model builder (KV cache, int8/int4 weight-only) instead of "
        "the full-sequence torch.export ONNX; needs the genai extra (pip install 'distilflow[genai]').",
    )
    precisions: list[Literal["fp32", "int8", "int4"]] = _f(
        ["fp32", "int8", "int4"], "Variants built into deploy/genai-<precision>/ (weight-only for int8 and int4)."
    )
    block_size: Literal[16, 32, 64, 128, 256] = _f(32, "int8/int4: weights per quantization block (one scale each).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = _f(
        4, "int8/int4 MatMulNBits compute: 4 = int8 activations (fastest on CPU), 1 = fp32, 0 = the provider's default."
    )
    quantize_embeddings: bool = _f(
        True, "int4: also store the embedding table in 4 bits (the builder quantizes embeddings in 4 bits only)."
    )
    execution_provider: Literal["cpu", "cuda"] = _f("cpu", "Target of the build (cuda: documented, untested here).")
    prompt_tokens: int = _f(64, "Benchmark: prompt length (the first tokens of held-out rows).")
    new_tokens: int = _f(
        64, "Benchmark: tokens decoded per prompt (end-of-text suppressed so every variant decodes all)."
    )
    repeats: int = _f(3, "Benchmark: timed repetitions per variant and batch size (the median is reported).")


@dataclass
class DeployConfig:
    enabled: bool = _f(True, "'distilflow run' ends with export, quantization and the benchmark table.")
    methods: list[Literal["dynamic", "static"]] = _f(
        ["dynamic", "static"], "ONNX Runtime int8 methods: dynamic (no calibration) and/or static (calibrated QDQ)."
    )
    bits: int = _f(8, "Quantization bits (the article's config shape; 8 is what ONNX Runtime supports here).")
    observe_steps: int = _f(16, "static: calibration batches of training data (the article's observe_steps).")
    calibration_batch: int = _f(32, "static: rows (samples or sequences) per calibration batch.")
    per_channel: bool = _f(False, "Per-output-channel weight scales instead of one per tensor.")
    reduce_range: Literal["auto"] | bool = _f(
        "auto",
        "7-bit int8 weights, which ONNX Runtime needs on x86 CPUs without VNNI (their U8S8 kernel saturates): "
        "auto = a probe of this machine's kernel decides; true for such a target or an unknown x86 one; false for "
        "VNNI or ARM targets.",
    )
    op_types: list[str] = _f(
        [], "ONNX operator types to quantise (empty = ONNX Runtime's defaults, e.g. MatMul, Gemm, Conv, Gather)."
    )
    exclude: list[str] = _f(
        [],
        "Regexes over ONNX node names or PyTorch module paths kept in float, e.g. 'lm_head' or 'classifier'.",
    )
    torch_backend: Literal["auto", "torchao", "torch_ao", "off"] = _f(
        "auto",
        "PyTorch-native int8: auto (torch.ao on CPU while PyTorch ships it, else torchao), torchao, torch_ao, off.",
    )
    batch_sizes: list[int] = _f(
        [1, 64], "Batch sizes (samples, or sequences of the data section's seq_len) whose latency is measured."
    )
    threads: int = _f(1, "CPU threads for every variant in the benchmark (fixed so that the ratios compare).")
    iterations: int = _f(20, "Timed calls per variant and batch size (after 3 warm-up calls).")
    parity_tolerance: float = _f(1e-3, "Largest allowed ONNX-vs-eager logit difference, relative to the largest logit.")
    tensorrt: bool = _f(
        False, "Also run ONNX Runtime's TensorRT provider (needs onnxruntime-gpu and a GPU; else skipped with a note)."
    )
    genai: GenaiConfig = _f(
        GenaiConfig(), "Causal LMs: generation through ONNX Runtime GenAI (KV cache, int8/int4), decode benchmark."
    )
