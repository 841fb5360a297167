"""deploy.reduce_range and the kernel probe behind 'auto', and what int8 guarantees on every x86-64 CPU.

ONNX Runtime's U8S8 kernel saturates int16 pair sums on x86 without VNNI (distilflow/deploy/int8_kernels.py).
The assertions here hold on any CPU: the bounds come from the scales in the quantized file, and
the kernel-dependent test asserts whichever side the probe reports (CI runs it natively and under
``qemu-x86_64 -cpu Haswell-v4``, so both sides are checked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distilflow.config import load_config
from distilflow.deploy.export import export_onnx
from distilflow.deploy.int8_kernels import decision, describe, resolve_reduce_range, u8s8_saturates
from distilflow.deploy.quantize import ort_dynamic
from distilflow.errors import UserError

from .conftest import run_onnx
from .int8_reference import Z_MAX, dequantized, initializers, noise_z

pytestmark = pytest.mark.int8_kernels


def never() -> bool:
    raise AssertionError("an explicit deploy.reduce_range must not depend on this machine")


def test_auto_follows_the_probe_and_an_explicit_value_ignores_it():
    assert resolve_reduce_range("auto", lambda: True) is True  # AVX2 / AVX-512 without VNNI
    assert resolve_reduce_range("auto", lambda: False) is False  # VNNI, AVX-only, ARM
    assert resolve_reduce_range(True, never) is True and resolve_reduce_range(False, never) is False

    for saturates in (True, False):
        info = decision("auto", lambda verdict=saturates: verdict)
        assert info["u8s8_saturates"] is saturates and info["reduce_range"] is saturates
        assert info["reduce_range_setting"] == "auto"
        assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert set(info["cpu_flags"]) <= {"sse4_1", "avx", "avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}
        line = describe(info)
        assert "\n" not in line and line.startswith(f"int8 kernels: ONNX Runtime {info['onnxruntime']}, CPU ")
        weights = "7-bit" if saturates else "8-bit"
        assert line.endswith(f"deploy.reduce_range auto -> {str(saturates).lower()} ({weights} weights).")
        assert ("saturating" in line) is saturates
    # Built on an AVX2 machine for a VNNI target: the file keeps 8-bit weights, the record says both.
    info = decision(False, lambda: True)
    assert info["reduce_range"] is False and info["u8s8_saturates"] is True
    assert describe(info).endswith("deploy.reduce_range false -> false (8-bit weights).")


def test_reduce_range_is_auto_by_default_and_checked_at_load():
    assert load_config(None, []).deploy.reduce_range == "auto"
    assert load_config(None, ["deploy.reduce_range=true"]).deploy.reduce_range is True
    assert load_config(None, ["deploy.reduce_range=false"]).deploy.reduce_range is False
    refused = r"^config key 'deploy.reduce_range': 'sometimes' is not allowed; expected 'auto' or bool$"
    with pytest.raises(UserError, match=refused):
        load_config(None, ["deploy.reduce_range=sometimes"])


def test_the_probe_reads_the_kernel_a_full_range_model_gets(fitted_mlp, held_out, tmp_path):
    """8-bit weights: within the rounding noise where the probe says exact, far outside where it says
    saturating. 7-bit weights (reduce_range): within it on every x86 CPU."""
    model, fp32 = fitted_mlp
    x, _ = held_out
    full = ort_dynamic(fp32, tmp_path / "full.onnx", reduce_range=False)
    z = noise_z(run_onnx(full, {"x": x}), model, full, "dynamic", x)
    if u8s8_saturates():
        assert z.max() > 2 * Z_MAX, z.max()
    else:
        assert z.max() <= Z_MAX, z.max()
    seven = ort_dynamic(fp32, tmp_path / "seven.onnx", reduce_range=True)
    assert noise_z(run_onnx(seven, {"x": x}), model, seven, "dynamic", x).max() <= Z_MAX


class OneLayer(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("setting", ["auto", True, False])
def test_one_int8_matmul_is_within_its_worst_case_bound(setting, per_channel, tmp_path):
    """Per output j of y = x W^T + b, dynamic int8 gives at most

        |y_int8 - y| <= s_x / 2 * sum_k |W^_jk| + sum_k |x_k| |W^_jk - W_jk|   (+ float32 rounding),

    s_x the activation step (max(x) / 255 here, x >= 0) and W^ the dequantized weights: x rounds by
    at most s_x / 2 per element, W by exactly W^ - W, and the int32 sum is exact. The inputs are the
    worst case for a saturating kernel: activations near 255, neighbouring weights of one sign and
    near the largest (K = 256). 8-bit weights on a saturating kernel must break the bound.
    """
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    layer = OneLayer(256, 32).eval()
    signs = torch.randint(0, 2, (32, 128), generator=g).repeat_interleave(2, dim=1) * 2 - 1  # pairs share a sign
    with torch.no_grad():
        layer.linear.weight.copy_(signs * (0.5 + 0.5 * torch.rand(32, 256, generator=g)))
    x = 0.8 + 0.2 * torch.rand(64, 256, generator=g)  # (N, K), uint8 204..255
    fp32 = export_onnx(layer, {"x": x[:2]}, tmp_path / "layer.onnx", kind="classifier")
    reduce_range = resolve_reduce_range(setting)
    path = ort_dynamic(fp32, tmp_path / "int8.onnx", reduce_range=reduce_range, per_channel=per_channel)
    got = run_onnx(path, {"x": x.numpy()}).astype(np.float64)  # (N, 32)

    w = layer.linear.weight.detach().double().numpy()  # (32, K)
    b = layer.linear.bias.detach().double().numpy()
    w_hat = dequantized(initializers(path), "linear.weight_Transposed", axis=1).T  # (32, K)
    xs = x.double().numpy()
    step = xs.max() / 255
    bound = step / 2 * np.abs(w_hat).sum(1) + np.abs(xs) @ np.abs(w_hat - w).T
    bound += 1e-6 * (np.abs(xs) @ np.abs(w_hat).T + np.abs(b))  # float32 rescaling and bias add
    error = np.abs(got - (xs @ w.T + b))
    if not reduce_range and u8s8_saturates():
        assert (error > bound).any()  # VPMADDUBSW's clamped pair sums: not a rounding error
        return
    assert (error <= bound).all(), float((error / bound).max())
    assert error.max() > 0.05 * bound.max()  # a bound that means something: the error is of its order
