"""Post-training int8 quantization: ONNX Runtime dynamic and static (QDQ), and PyTorch-native.

- ``ort_dynamic``: weights int8 ahead of time, activations quantised per batch at run time
  (``onnxruntime.quantization.quantize_dynamic``). No calibration data.
- ``ort_static``: weights and activations int8 with scales calibrated on ``observe_steps`` batches
  of training data (``quantize_static``, QDQ format, MinMax calibration).
- ``torch_int8``: for users who stay in PyTorch; ``torch.ao.quantization.quantize_dynamic`` on CPU
  while PyTorch still ships it (deprecated upstream, but faster here), else torchao's int8
  dynamic-activation / int8-weight linear layers. docs/BENCHMARKS.md has the measurement.

Which operator types are quantised, and which nodes are left in float (by a pattern over node names
or module paths, e.g. the embedding lookup or the last layer), is configurable;
:func:`quantized_summary` reports it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from distilflow.deploy import quiet_logs
from distilflow.deploy.int8_kernels import resolve_reduce_range
from distilflow.errors import UserError
from distilflow.storage import atomic_write

IntType = Literal["int8", "uint8"]
INT8_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear", "QuantizeLinear")


def _load(path: Path):
    import onnx

    if not Path(path).is_file():
        raise UserError(f"ONNX model '{path}' does not exist")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends for non-model files
        raise UserError(f"'{path}' is not an ONNX model ({type(exc).__name__})") from None


def _module_paths(node) -> list[str]:
    """The module paths of an exported node (``classifier``, ``model.lm_head``), from the exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return [m for m in re.findall(r"'([^']*)'", prop.value) if m]
    return []


def weight_nodes(model) -> list[str]:
    """Nodes that use a stored weight (an initializer): MatMul / Gemm / Conv by their second input,
    an embedding lookup (Gather) by its table."""
    initializers = {i.name for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if (n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1:2] and n.input[1] in initializers)
        or (n.op_type == "Gather" and n.input[0] in initializers)
    ]


def _excluded_nodes(model, patterns: list[str]) -> list[str]:
    """Nodes whose ONNX name (``node_linear_2``) or module path (``classifier``) matches a pattern.

    The exporter names nodes after the op (``node_linear_2``), not the layer, so the module path is
    what a user knows; a pattern that matches nothing is an error rather than a silent no-op.
    """
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as exc:
        raise UserError(f"deploy.exclude: {exc.pattern!r} is not a regular expression ({exc})") from None
    names, used = [], set()
    for node in model.graph.node:
        keys = [node.name, *_module_paths(node)]
        hits = {c.pattern for c in compiled if any(c.search(k) for k in keys)}
        if hits:
            names.append(node.name)
            used |= hits
    unused = [p for p in patterns if p not in used]
    if unused:
        raise UserError(
            f"deploy.exclude: {unused[0]!r} matches no ONNX node name or module path "
            f"(nodes such as {', '.join(n.name for n in model.graph.node[:3])})"
        )
    return names


def _quant_type(name: IntType):
    from onnxruntime.quantization import QuantType

    return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]


def ort_dynamic(
    src: Path,
    dst: Path,
    *,
    per_channel: bool = False,
    reduce_range: bool | Literal["auto"] = "auto",
    weight_type: IntType = "int8",
    op_types: list[str] | None = None,
    exclude: list[str] = (),
) -> Path:
    """int8 weights, per-batch uint8 activations. ``exclude``: regexes over node names or module paths kept in float.

    ``reduce_range``: 7-bit weights, which x86 CPUs without VNNI need; 'auto': where this machine's
    kernel needs them (:mod:`distilflow.deploy.int8_kernels`). ``weight_type`` 'uint8' makes ONNX
    Runtime run its U8U8 kernels (no saturation, but slower; benchmarks/int8_kernels.py).
    """
    from onnxruntime.quantization import quantize_dynamic

    model = _load(src)
    excluded = _excluded_nodes(model, list(exclude))
    # quantize_dynamic rewrites each Gemm as '<name>_MatMul' + '<name>_Add' before it reads nodes_to_exclude.
    gemms = {n.name for n in model.graph.node if n.op_type == "Gemm"}
    excluded += [f"{name}_MatMul" for name in excluded if name in gemms]
    with quiet_logs():
        atomic_write(
            dst,
            lambda tmp: quantize_dynamic(
                str(src),
                tmp,
                op_types_to_quantize=op_types or None,
                per_channel=per_channel,
                reduce_range=resolve_reduce_range(reduce_range),
                weight_type=_quant_type(weight_type),
                nodes_to_exclude=excluded,
            ),
        )
    return dst


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def ort_static(
    src: Path,
    dst: Path,
    calibration: list[dict[str, np.ndarray]],
    *,
    per_channel: bool = False,
    reduce_range: bool | Literal["auto"] = "auto",
    activation_type: IntType = "int8",
    weight_type: IntType = "int8",
    op_types: list[str] | None = None,
    exclude: list[str] = (),
) -> Path:
    """int8 weights and activations (QDQ), scales from MinMax over ``calibration`` feeds.

    int8 activations are symmetric (ONNX Runtime shifts them to uint8 on x86, so they meet the same
    U8S8 kernels as dynamic quantization); 'uint8' activations are asymmetric. ``reduce_range`` and
    ``weight_type`` as in :func:`ort_dynamic`.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    if not calibration:
        raise UserError(
            "static quantization needs calibration data; set deploy.observe_steps >= 1 and give training data"
        )
    model = _load(src)
    with quiet_logs():
        # Only layers with a stored weight are quantized: a MatMul of two activations (attention
        # scores, attention x values) in int8 ruined a small LM here (perplexity 44 -> 321).
        atomic_write(
            dst,
            lambda tmp: quantize_static(
                str(src),
                tmp,
                _Reader(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types or None,
                nodes_to_quantize=weight_nodes(model),
                per_channel=per_channel,
                reduce_range=resolve_reduce_range(reduce_range),
                activation_type=_quant_type(activation_type),
                weight_type=_quant_type(weight_type),
                nodes_to_exclude=_excluded_nodes(model, list(exclude)),
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": activation_type == "int8"},
            ),
        )
    return dst


def strip_metadata(path: Path) -> None:
    """Drop the exporter's per-node metadata (source stack traces, module scopes) from a final file.

    It can be several times the size of a small model's weights and holds build paths; it is only
    needed while quantizing (``exclude`` matches module paths through it).
    """
    import onnx

    model = _load(path)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    model.graph.doc_string = ""
    atomic_write(path, lambda tmp: onnx.save(model, tmp))  # a kill here leaves the file as it was


def quantized_summary(path: Path) -> dict[str, int]:
    """Counts of float matmul/conv/gather nodes and of int8 (or GenAI 4/8-bit weight-only) nodes in an ONNX file."""
    model = _load(path)
    ops = Counter(n.op_type for n in model.graph.node)
    keys = ("MatMul", "Gemm", "Conv", "Gather", *INT8_OPS, "DequantizeLinear", "MatMulNBits", "GatherBlockQuantized")
    return {k: ops[k] for k in keys if ops[k]}


def _has_torch_ao() -> bool:
    return hasattr(getattr(torch, "ao", None), "quantization") and hasattr(torch.ao.quantization, "quantize_dynamic")


def torch_int8(model: nn.Module, *, backend: str = "auto") -> tuple[nn.Module, str]:
    """A copy of ``model`` with int8 ``nn.Linear`` layers; returns it and the backend used.

    ``backend``: 'torch_ao' (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
    quantized per batch; deprecated upstream), 'torchao' (its successor's int8 dynamic-activation,
    int8-weight layers), or 'auto': torch.ao on CPU while PyTorch still ships it, else torchao.
    Measured side by side on CPU (docs/BENCHMARKS.md, benchmarks/torch_int8.py), torch.ao ran at
    1.08x fp32 speed on the LM student at batch 64 and torchao at 0.50x; on GPUs torchao is the
    maintained path.
    """
    import copy

    model = copy.deepcopy(model).eval()
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if backend == "torchao" or (backend == "auto" and not (on_cpu and _has_torch_ao())):
        try:
            with quiet_logs():
                from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError:
            raise UserError("deploy.torch_backend 'torchao' needs the torchao package: pip install torchao") from None
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model, "torchao"
    if not _has_torch_ao():
        raise UserError("deploy.torch_backend 'torch_ao': this PyTorch has no torch.ao.quantization; use torchao")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return quantized, "torch_ao"
