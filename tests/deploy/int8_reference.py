"""The int8 test model and the error bounds that int8 quantization itself implies, on any CPU.

Used by the deploy tests and by benchmarks/int8_kernels.py (which measures the same fitted MLP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from distilflow.deploy.export import export_onnx
from distilflow.models.zoo import MLP

FEATURES, CLASSES = 40, 10


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of 10 well separated Gaussian classes in 40 dims (fixed centres, noise by ``seed``)."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0)) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, FEATURES, generator=g), y


def fitted_mlp(folder: Path) -> tuple[nn.Module, Path]:
    """A weight-dominated MLP (40 -> 256 -> 256 -> 10, ~79k weights) that classifies the blobs, and its ONNX file.

    Hidden layers stay random; the classifier is fitted by least squares to one-hot labels, so the
    logits have real margins (an int8 model can be judged by its argmax) without a training loop.
    """
    torch.manual_seed(0)
    model = MLP((FEATURES,), CLASSES, [256, 256]).eval()
    x, y = blobs(800, seed=1)
    with torch.no_grad():
        hidden = torch.cat([model.layers(x), torch.ones(len(x), 1)], dim=1)  # (N, 257)
        solution = torch.linalg.lstsq(hidden, nn.functional.one_hot(y, CLASSES).float()).solution  # (257, C)
        model.classifier.weight.copy_(solution[:-1].T)
        model.classifier.bias.copy_(solution[-1])
    return model, export_onnx(model, {"x": x[:2]}, Path(folder) / "mlp.onnx", kind="classifier")


def calibration_feeds() -> list[dict]:
    """4 batches of 32 blobs (seed 3): the static-quantization calibration set of the tests."""
    x, _ = blobs(128, seed=3)
    return [{"x": x[i : i + 32].numpy()} for i in range(0, 128, 32)]


# ---------------------------------------------------------------- what int8 guarantees
#
# An int8 model computes with rounded numbers: each weight is rounded to its grid once (the file
# holds q and the scale, so the dequantized weight q * scale is known exactly), and each
# activation is rounded to its grid (step s: per batch for dynamic quantization, calibrated for
# static) at every quantization point, an error in [-s/2, s/2], or clipped at the grid's ends.
# With the integer sums exact (int32, as every kernel that does not saturate computes them), the
# int8 logits are therefore: the float model with the dequantized weights (and the static model's
# clipping), plus the activation rounding errors carried to the logits. Those are the sum of many
# independent errors, uniform on [-s/2, s/2] (variance s^2 / 12, the classic quantization-noise
# model: Widrow & Kollar, "Quantization Noise", 2008), each multiplied by the derivative of the
# logit with respect to the rounded value. Nothing in it depends on the CPU.

Q_UINT8 = (0, 255)
Q_INT8 = (-128, 127)


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def dequantized(tensors: dict[str, np.ndarray], name: str, *, axis: int) -> np.ndarray:
    """``(q - zero_point) * scale`` of the stored tensor ``name`` (float64); per-channel scales lie along ``axis``."""
    q = tensors[f"{name}_quantized"].astype(np.float64)
    scale = tensors.get(f"{name}_scale", tensors.get(f"{name}_quantized_scale")).astype(np.float64)
    zero = tensors.get(f"{name}_zero_point", tensors.get(f"{name}_quantized_zero_point")).astype(np.float64)
    shape = [1] * q.ndim
    if scale.ndim:
        shape[axis] = -1
    return (q - zero.reshape(shape)) * scale.reshape(shape)


@dataclass
class Quantize:
    """A quantization point: activations rounded to step ``scale`` (None: per batch, uint8 from the range)."""

    scale: float | None
    qrange: tuple[int, int] = Q_UINT8


@dataclass
class Linear:
    weight: np.ndarray  # (out, in), dequantized
    bias: np.ndarray  # (out,)


class Relu:
    pass


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def mlp_int8_ops(names: list[str], path: Path, method: str) -> list:
    """The int8 MLP of ``path`` (from :func:`distilflow.deploy.quantize.ort_dynamic` or ``ort_static``;
    ``names``: its Linear layers in order) as the float operations and quantization points it computes,
    with the weights read from the file."""
    tensors = initializers(path)
    ops: list = []
    for index, name in enumerate(names):
        if method == "dynamic":  # DynamicQuantizeLinear (uint8, per batch) -> MatMulInteger with W^T -> + float bias
            weight = dequantized(tensors, f"{name}.weight_Transposed", axis=1).T
            ops += [Quantize(None), Linear(weight, tensors[f"{name}.bias"].astype(np.float64))]
        else:  # QDQ: the input of each Gemm and its output are quantized (int8, symmetric, calibrated)
            step = "x" if index == 0 else ("relu" if index == 1 else f"relu_{index - 1}")
            out = "logits" if index == len(names) - 1 else ("linear" if index == 0 else f"linear_{index}")
            weight = dequantized(tensors, f"{name}.weight", axis=0)
            bias = dequantized(tensors, f"{name}.bias", axis=0)
            ops += [Quantize(float(tensors[f"{step}_scale"]), Q_INT8), Linear(weight, bias)]
            ops += [Quantize(float(tensors[f"{out}_scale"]), Q_INT8)]
        if index < len(names) - 1:
            ops.append(Relu())
    return ops


def _step(values: np.ndarray, point: Quantize) -> tuple[float, float, float]:
    """Step and the clipping range of a quantization point on ``values`` (the whole batch, as ONNX Runtime sees it)."""
    low, high = point.qrange
    if point.scale is not None:
        return point.scale, low * point.scale, high * point.scale
    # DynamicQuantizeLinear: the range always holds 0; the zero point is rounded, so the grid may end
    # up to half a step inside the range (the error there is still <= s / 2).
    scale = (max(values.max(), 0.0) - min(values.min(), 0.0)) / (high - low)
    return scale, -np.inf, np.inf


def int8_expectation(ops: list, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 model's logits without rounding noise (dequantized weights, clipping), and the
    standard deviation of the rounding noise on each logit, both (N, C).

    The noise is carried to the logits to first order: d logit / d value at each quantization
    point, by a backward pass through the linear layers and the ReLU masks of the forward.
    """
    values = x.astype(np.float64)  # (N, F)
    tape = []
    for op in ops:
        if isinstance(op, Quantize):
            scale, low, high = _step(values, op)
            values = np.clip(values, low, high)
            tape.append(("noise", scale))
        elif isinstance(op, Linear):
            values = values @ op.weight.T + op.bias
            tape.append(("linear", op.weight))
        else:
            tape.append(("relu", values > 0))
            values = np.maximum(values, 0.0)
    n, classes = values.shape
    gradient = np.broadcast_to(np.eye(classes), (n, classes, classes)).copy()  # d logits / d values: (N, C, width)
    variance = np.zeros((n, classes))
    for kind, item in reversed(tape):
        if kind == "noise":
            variance += (gradient**2).sum(-1) * item**2 / 12
        elif kind == "linear":
            gradient = gradient @ item
        else:
            gradient = gradient * item[:, None, :]
    return values, np.sqrt(variance)


# The largest |z| a test allows, z = (int8 logit - its noise-free value) / noise std: each logit's
# error is a sum of many (16 to 256 per layer) independent rounding errors, close to Gaussian, and
# a Gaussian passes 6 sigma somewhere in 4,000 logits with probability ~1e-5. Measured with exact
# kernels (AVX-512 VNNI, emulated AVX2 with reduce_range, emulated AVX): 3.8 at most, rms 0.75-1.0;
# with the saturating kernel (emulated AVX2, 8-bit weights): 8 to 105 (docs/BENCHMARKS.md).
Z_MAX = 6.0


def noise_z(got: np.ndarray, model: nn.Module, path: Path, method: str, x: np.ndarray) -> np.ndarray:
    """|int8 logits - their noise-free value| in units of the noise std, (N, C); ``got`` from one batch ``x``."""
    expected, sigma = int8_expectation(mlp_int8_ops(linear_names(model), path, method), x)
    slack = 1e-5 * np.abs(expected).max()  # float32 rescaling of exact int32 sums
    return np.abs(got - expected) / (sigma + slack)


def _match_linear(linears: dict[str, nn.Linear], weight_hat: np.ndarray, step: float) -> str:
    """The Linear whose weight rounds to ``weight_hat`` (out, in): the exporter names weights val_N."""
    found = [
        name
        for name, m in linears.items()
        if m.weight.shape == weight_hat.shape
        and np.abs(m.weight.detach().double().numpy() - weight_hat).max() <= step / 2 + 1e-7
    ]
    assert len(found) == 1, (weight_hat.shape, found)
    return found[0]


@dataclass
class _Matmul:
    """A weight matmul of an int8 LM file: the dequantized weight (out, in), the input's step (None:
    per batch, uint8) and the output's (static QDQ quantizes it again; None: not quantized)."""

    weight: torch.Tensor
    in_step: float | None
    out_step: float | None


def _lm_matmuls(path: Path, linears: dict[str, nn.Linear]) -> tuple[dict[nn.Module, _Matmul], list[str]]:
    """The file's weight matmuls matched to the model's Linears, and the names of 8-bit embedding tables."""
    graph = onnx.load(str(path)).graph
    tensors = initializers(path)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def stored(name: str) -> str | None:  # 'val_41' when ``name`` is DequantizeLinear(val_41_quantized)
        node = producer.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in tensors:
            return node.input[0].removesuffix("_quantized")
        return None

    found: dict[nn.Module, _Matmul] = {}
    tables = []
    for node in graph.node:
        if node.op_type == "MatMulInteger":  # dynamic: uint8 activations of this batch x stored int8 weight
            base, in_step, out_step = node.input[1].removesuffix("_quantized"), None, None
        elif node.op_type == "MatMul" and stored(node.input[1]):  # static QDQ
            base = stored(node.input[1])
            in_step = float(tensors[producer[node.input[0]].input[1]])  # DequantizeLinear(QuantizeLinear(x))
            requant = [c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"]
            out_step = float(tensors[requant[0].input[1]]) if requant else None
        elif node.op_type == "Gather" and node.input[0].endswith("_quantized"):  # dynamic: Gather, then DQ
            tables.append(node.input[0].removesuffix("_quantized"))
            continue
        elif node.op_type == "Gather" and stored(node.input[0]):  # static: DQ of the table, then Gather
            tables.append(stored(node.input[0]))
            continue
        else:
            continue
        weight_hat = dequantized(tensors, base, axis=1).T  # stored (in, out)
        linear = linears[_match_linear(linears, weight_hat, float(tensors[f"{base}_scale"].max()))]
        found[linear] = _Matmul(torch.from_numpy(weight_hat).float(), in_step, out_step)
    return found, tables


def lm_int8_noise(
    model: nn.Module, path: Path, feeds: dict[str, torch.Tensor], *, samples: int = 48, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """For a causal LM quantized by ``ort_dynamic`` or ``ort_static``: its logits without rounding
    noise and the noise std on each, (B, T, V).

    The model of :func:`int8_expectation`, by Monte Carlo through the eager model (attention, RMSNorm
    and SiLU are not linear): every Linear that the file computes in int8 uses its dequantized
    weight, on an input carrying uniform noise of its step (per batch, (max(x, 0) - min(x, 0)) / 255,
    for dynamic; calibrated, with int8 clipping, for static) and, for static, with its output rounded
    again; an 8-bit embedding table is looked up dequantized. One tensor feeding several matmuls
    (q, k, v) is rounded once, as in the file.
    """
    tensors = initializers(path)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    matmuls, tables = _lm_matmuls(path, linears)
    state = {"noise": False, "drawn": {}}
    generator = torch.Generator().manual_seed(seed)

    def rounded(x: torch.Tensor, step: float | None) -> torch.Tensor:
        key = id(x)  # the same tensor object: q, k and v of one layer, or gate and up
        if step is None:
            step = float(x.max().clamp(min=0) - x.min().clamp(max=0)) / 255
            clipped = x
        else:
            clipped = x.clamp(Q_INT8[0] * step, Q_INT8[1] * step)
        if not state["noise"]:
            return clipped
        if key not in state["drawn"]:  # x is kept alive with its draw, so its id is not reused in this pass
            state["drawn"][key] = (x, (torch.rand(x.shape, generator=generator) - 0.5) * step)
        return clipped + state["drawn"][key][1]

    def linear_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        spec = matmuls[module]
        out = nn.functional.linear(rounded(args[0], spec.in_step), spec.weight, module.bias)
        return out if spec.out_step is None else rounded(out, spec.out_step)

    handles = [module.register_forward_hook(linear_hook) for module in matmuls]
    if tables:  # the 8-bit embedding table, looked up dequantized
        (table,) = tables
        table_hat = torch.from_numpy(dequantized(tensors, table, axis=0)).float()
        embedding = model.get_input_embeddings()
        handles.append(embedding.register_forward_hook(lambda module, args, out: table_hat[args[0]]))
    try:
        with torch.no_grad():
            expected = model(**feeds).logits.double().numpy()
            state["noise"] = True
            draws = []
            for _ in range(samples):
                state["drawn"] = {}
                draws.append(model(**feeds).logits.double().numpy())
    finally:
        for handle in handles:
            handle.remove()
    return expected, np.stack(draws).std(axis=0, ddof=1)
