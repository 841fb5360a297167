"""Which int8 kernel ONNX Runtime runs on this CPU, and the ``deploy.reduce_range`` decision it implies.

ONNX Runtime's x86 U8S8 GEMM (uint8 activations x int8 weights: what ``quantize_dynamic`` makes, and
what a static QDQ model with int8 activations becomes on x86 once its activations are shifted to
uint8) multiplies with ``VPMADDUBSW`` on AVX2 and AVX-512 CPUs without VNNI. That instruction adds
each pair of neighbouring u8 x s8 products in *saturating* int16: 255 x 127 x 2 = 64,770 is clamped
to 32,767, so a full-range int8 model computes wrong sums there. CPUs with VNNI (``VPDPBUSD``,
AVX512-VNNI or AVX-VNNI) accumulate in int32 and are exact; so is the SSE4.1 path ONNX Runtime's
Linux build takes on an AVX-only CPU. ``reduce_range`` stores weights in 7 bits ([-64, 64]):
255 x 64 x 2 = 32,640 fits, on every x86 CPU. (ONNX Runtime's quantization guide, "When and why do
I need to try U8U8?"; docs/BENCHMARKS.md has the measurement.)

The decision is behavioural: :func:`u8s8_saturates` runs one saturating MatMulInteger through ONNX
Runtime in this process, so it tests the very kernel a quantized model would get, also under an
emulated CPU (``qemu-x86_64 -cpu Haswell-v4``), where ``/proc/cpuinfo`` still shows the host.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

# The CPU flags that decide ONNX Runtime's int8 kernels (Linux /proc/cpuinfo names).
INT8_FLAGS = ("sse4_1", "avx", "avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
PROBE_K = 64  # accumulation length of the probe: 32 saturated pairs move the sum by half


def _probe_model() -> bytes:
    """MatMulInteger of uint8 activations (M, K) by a stored int8 weight (K, 8) of all 127, as ONNX bytes."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((PROBE_K, 8), 127, np.int8), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["activations", "weight"], ["sums"])],
        "u8s8_probe",
        [helper.make_tensor_value_info("activations", TensorProto.UINT8, [None, PROBE_K])],
        [helper.make_tensor_value_info("sums", TensorProto.INT32, [None, 8])],
        [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@functools.cache
def u8s8_saturates() -> bool:
    """True when this CPU's ONNX Runtime U8S8 GEMM clamps pair sums to int16 (AVX2 / AVX-512 without VNNI).

    All-255 activations times all-127 weights: the exact sum is 255 * 127 * K in every output; a
    saturating kernel returns 32,767 * K / 2 instead.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(_probe_model(), options, providers=["CPUExecutionProvider"])
    (sums,) = session.run(None, {"activations": np.full((4, PROBE_K), 255, np.uint8)})
    return bool((sums != 255 * 127 * PROBE_K).any())


def cpu_flags() -> list[str]:
    """The int8-relevant flags of /proc/cpuinfo (empty where there is none). Under qemu-user this is
    the host's CPU, not the emulated one: :func:`u8s8_saturates` and torch's CPUID reading are not."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [f for f in INT8_FLAGS if f in present]
    return []


def kernel_report(saturates: Callable[[], bool] = u8s8_saturates) -> dict[str, Any]:
    """What the int8 variants of a deploy run ran on: ONNX Runtime, the CPU as seen three ways, the probe."""
    import onnxruntime as ort
    import torch

    saturating = saturates()
    return {
        "onnxruntime": ort.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # torch's own CPUID reading
        "cpu_flags": cpu_flags(),
        "u8s8_saturates": saturating,
        "kernel_path": "U8S8 with saturating int16 pair sums (x86 without VNNI)"
        if saturating
        else "U8S8 with exact int32 sums",
    }


def resolve_reduce_range(setting: Literal["auto"] | bool, saturates: Callable[[], bool] = u8s8_saturates) -> bool:
    """``deploy.reduce_range``: an explicit true/false is kept (the target is another machine);
    ``auto`` is true exactly when this machine's U8S8 kernel saturates."""
    if setting == "auto":
        return saturates()
    return bool(setting)


def decision(setting: Literal["auto"] | bool, saturates: Callable[[], bool] = u8s8_saturates) -> dict[str, Any]:
    """:func:`kernel_report` plus the setting and what it resolved to: ``deploy_info['int8_kernels']``."""
    report = kernel_report(saturates)
    verdict = report["u8s8_saturates"]
    return report | {"reduce_range_setting": setting, "reduce_range": resolve_reduce_range(setting, lambda: verdict)}


def describe(info: dict[str, Any]) -> str:
    """One line for bench.md and the report: the kernel path, the setting and what it resolved to."""
    flags = " ".join(info["cpu_flags"]) or "unknown"
    weights = "7-bit weights" if info["reduce_range"] else "8-bit weights"
    return (
        f"int8 kernels: ONNX Runtime {info['onnxruntime']}, CPU {info['cpu_capability']} "
        f"(/proc/cpuinfo: {flags}); probe: {info['kernel_path']}; "
        f"deploy.reduce_range {str(info['reduce_range_setting']).lower()} -> "
        f"{str(info['reduce_range']).lower()} ({weights})."
    )
