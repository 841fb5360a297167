"""ONNX export with its parity check, and int8 quantization (ONNX Runtime dynamic/static, PyTorch native).

Every ONNX output is checked against the eager model or against numbers computed here by hand (an
independent ONNX Runtime session, the int8 weights dequantized with their scales, calibration ranges).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from distilflow.deploy.export import check_parity, export_onnx
from distilflow.deploy.quantize import ort_dynamic, ort_static, quantized_summary, torch_int8, weight_nodes
from distilflow.errors import UserError
from distilflow.models.zoo import CNN, MLP

from .conftest import VOCAB, lm_feeds, run_onnx, tiny_llama
from .int8_reference import CLASSES, FEATURES, Z_MAX, blobs, initializers, lm_int8_noise, noise_z


def eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


# ---------------------------------------------------------------- export and parity


def cnn_with_running_stats() -> nn.Module:
    torch.manual_seed(0)
    model = CNN((FEATURES,), CLASSES, [8, 8])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):  # non-trivial statistics, so that BatchNorm is exported for real
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_classifier_export_matches_eager_at_other_batch_sizes(arch, tmp_path):
    torch.manual_seed(0)
    model = MLP((FEATURES,), CLASSES, [32, 32]).eval() if arch == "mlp" else cnn_with_running_stats()
    x, _ = blobs(20, seed=4)
    path = export_onnx(model, {"x": x[:2]}, tmp_path / "model.onnx", kind="classifier")
    assert path == tmp_path / "model.onnx" and path.stat().st_size > 0

    parity = check_parity(model, path, {"x": x[2:7]}, kind="classifier")
    want = eager(model, x[2:7].numpy())
    got = run_onnx(path, {"x": x[2:7].numpy()})
    assert parity.max_abs == pytest.approx(float(np.abs(got - want).max()), abs=1e-9)
    assert parity.max_abs < 1e-5 and parity.max_rel < 1e-5
    assert parity.max_rel == pytest.approx(parity.max_abs / float(np.abs(want).max()), abs=1e-12)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    assert spec.name == "x" and isinstance(spec.shape[0], str) and spec.shape[1:] == [FEATURES]
    for batch in (1, 13):  # the export example had 2 rows
        rows = x[:batch].numpy()
        got = run_onnx(path, {"x": rows})
        assert got.shape == (batch, CLASSES)
        np.testing.assert_allclose(got, eager(model, rows), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A tiny Llama and its ONNX file, exported with 2 rows of 8 tokens."""
    model = tiny_llama()
    return model, export_onnx(
        model, lm_feeds(2, 8, seed=0), tmp_path_factory.mktemp("lm") / "lm.onnx", kind="causal_lm"
    )


def test_llama_export_matches_eager_at_other_batch_and_sequence_lengths(llama_onnx):
    model, path = llama_onnx
    parity = check_parity(model, path, lm_feeds(3, 13, seed=1), kind="causal_lm")
    assert parity.max_abs < 1e-4 and parity.max_rel < 1e-5

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert all(isinstance(d, str) for i in session.get_inputs() for d in i.shape)  # batch and sequence dynamic
    padded = lm_feeds(2, 11, seed=2)
    padded["attention_mask"][0, 7:] = 0  # a shorter first row, right-padded
    for feeds in (lm_feeds(1, 5, seed=3), lm_feeds(4, 20, seed=4), padded):
        got = run_onnx(path, {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            want = model(**feeds).logits.numpy()  # (B, T, V)
        assert got.shape == want.shape == (*feeds["input_ids"].shape, VOCAB)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_parity_above_tolerance_is_a_user_error(tmp_path):
    torch.manual_seed(0)
    model = MLP((FEATURES,), CLASSES, [32, 32]).eval()
    x, _ = blobs(8, seed=5)
    path = export_onnx(model, {"x": x[:2]}, tmp_path / "mlp.onnx", kind="classifier")
    largest = float(np.abs(eager(model, x.numpy())).max())
    with torch.no_grad():
        model.classifier.bias += 1e-3 * largest  # the eager model moves on after export: every logit by this much
    parity = check_parity(model, path, {"x": x}, kind="classifier", tolerance=1e-2)
    assert parity.max_rel == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(
        UserError, match=r"does not match the eager model: max abs diff .* \(tolerance 0.0001 relative\)"
    ):
        check_parity(model, path, {"x": x}, kind="classifier", tolerance=1e-4)
    with torch.no_grad():
        model.classifier.bias -= 1e-3 * largest
    assert check_parity(model, path, {"x": x}, kind="classifier", tolerance=1e-6).max_rel < 1e-6

    wider = MLP((FEATURES,), CLASSES + 2, [32, 32]).eval()
    with pytest.raises(UserError, match=r"logits of shape \(8, 10\), the eager model \(8, 12\)"):
        check_parity(wider, path, {"x": x}, kind="classifier")


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it with a symbolic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class LogGamma(nn.Module):
    """An operator (lgamma) that ONNX has no function for."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(self.linear(x).abs() + 1)


@pytest.mark.parametrize(
    "module, expected",
    [
        (DataDependentBranch, r"data-dependent expression .* \(at test_export_quantize\.py:\d+: if x\.sum\(\) > 0:\)$"),
        (LogGamma, r"operator prims\.lgamma cannot be exported$"),
    ],
)
def test_model_the_exporter_cannot_handle_is_one_line(module, expected, tmp_path, capsys):
    with pytest.raises(UserError) as info:
        export_onnx(module().eval(), {"x": torch.randn(3, FEATURES)}, tmp_path / "m.onnx", kind="classifier")
    message = str(info.value)
    assert message.startswith("ONNX export of the classifier model failed: ")
    assert "\n" not in message and "\x1b" not in message and len(message) < 400
    assert re.search(expected, message), message
    assert capsys.readouterr().err == ""  # the exporter's graph dump does not reach the terminal
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- ONNX Runtime int8


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def check_int8_weights(path: Path, model: nn.Module, *, suffix: str, per_channel: bool, reduce_range: bool) -> None:
    """Every Linear weight is stored as int8 whose dequantized value (q * scale) is the fp32 weight.

    Symmetric int8 (ONNX Runtime's QInt8 weights): scale = max|W| / 127, per tensor or per output
    channel; with reduce_range 7 bits, q in [-64, 64] and scale = max|W| / 64.
    """
    qmax = 64 if reduce_range else 127
    tensors = initializers(path)
    for name, linear in (
        ("layers.0", model.layers[0]),
        ("layers.2", model.layers[2]),
        ("classifier", model.classifier),
    ):
        w = linear.weight.detach().numpy()  # (out, in)
        q, scale = tensors[f"{name}.weight{suffix}_quantized"], tensors[f"{name}.weight{suffix}_scale"]
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() == qmax
        if suffix == "_Transposed":  # dynamic quantization turns Gemm into MatMul with W^T
            q = q.T
        absmax = np.abs(w).max(axis=1) if per_channel else np.abs(w).max()
        assert scale.shape == ((w.shape[0],) if per_channel else ())
        np.testing.assert_allclose(scale, absmax / qmax, rtol=1e-5)
        per_row = scale[:, None] if per_channel else scale
        assert np.abs(q * per_row - w).max() <= (per_row / 2 + 1e-7).max()


def check_int8_noise(got: np.ndarray, model: nn.Module, path: Path, method: str, x: np.ndarray) -> None:
    """The int8 logits are the dequantized model's plus rounding noise of the size the scales imply."""
    z = noise_z(got, model, path, method, x)
    assert z.max() <= Z_MAX, f"int8 logits off by {z.max():.1f} noise std (a saturating kernel?)"
    assert np.sqrt((z**2).mean()) <= 1.5  # the noise model gives <= 1 (measured 0.8)


def check_lm_int8_noise(got: np.ndarray, model: nn.Module, path: Path, feeds: dict[str, torch.Tensor]) -> None:
    """As :func:`check_int8_noise`, for a causal LM (noise std by Monte Carlo through the eager model)."""
    expected, sigma = lm_int8_noise(model, path, feeds)
    z = np.abs(got - expected) / (sigma + 1e-5 * np.abs(expected).max())
    assert z.max() <= Z_MAX, f"int8 logits off by {z.max():.1f} noise std (a saturating kernel?)"
    assert np.sqrt((z**2).mean()) <= 1.5  # the noise model gives 1 (measured 1.0)


@pytest.mark.int8_kernels
def test_dynamic_int8_is_smaller_and_agrees(fitted_mlp, held_out, reduce_range, tmp_path):
    model, fp32 = fitted_mlp
    x, y = held_out
    reference = eager(model, x)
    assert (reference.argmax(-1) == y).mean() > 0.95  # the fitted model is a real classifier
    assert quantized_summary(fp32) == {"Gemm": 3}

    path = ort_dynamic(fp32, tmp_path / "dyn.onnx", reduce_range=reduce_range)
    summary = quantized_summary(path)
    assert summary == {"MatMulInteger": 3, "DynamicQuantizeLinear": 3}
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulInteger") == 3 and "Gemm" not in ops and "MatMul" not in ops
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert weights > 0.99 * sum(p.numel() for p in model.parameters())  # dominated by weights
    ratio = fp32.stat().st_size / path.stat().st_size
    assert 3.0 < ratio < 4.2, ratio
    check_int8_weights(path, model, suffix="_Transposed", per_channel=False, reduce_range=reduce_range)

    got = run_onnx(path, {"x": x})  # one batch: one activation scale per layer, as int8_expectation takes it
    assert argmax_agreement(got, reference) >= 0.95
    check_int8_noise(got, model, path, "dynamic", x)


@pytest.mark.int8_kernels
def test_static_int8_is_calibrated_qdq(fitted_mlp, held_out, calibration, reduce_range, tmp_path):
    model, fp32 = fitted_mlp
    x, _ = held_out
    path = ort_static(fp32, tmp_path / "static.onnx", calibration, reduce_range=reduce_range)
    summary = quantized_summary(path)
    # QDQ: every Gemm stays, fed by DequantizeLinear of int8 weights, int32 biases and int8 activations.
    assert summary["Gemm"] == 3 and summary["QuantizeLinear"] >= 3 and summary["DequantizeLinear"] >= 9
    assert "MatMulInteger" not in summary
    check_int8_weights(path, model, suffix="", per_channel=False, reduce_range=reduce_range)
    # The input's scale comes from the calibration feeds: symmetric MinMax, max|x| / 127 (reduce_range
    # is for weights only).
    calibrated = max(float(np.abs(f["x"]).max()) for f in calibration)
    assert float(initializers(path)["x_scale"]) == pytest.approx(calibrated / 127, rel=1e-5)

    reference = eager(model, x)
    got = run_onnx(path, {"x": x})
    assert argmax_agreement(got, reference) >= 0.95
    check_int8_noise(got, model, path, "static", x)


def test_static_without_calibration_data_is_a_user_error(fitted_mlp, tmp_path):
    with pytest.raises(UserError, match="static quantization needs calibration data; set deploy.observe_steps"):
        ort_static(fitted_mlp[1], tmp_path / "static.onnx", [])
    assert not (tmp_path / "static.onnx").exists()


@pytest.mark.int8_kernels
@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_per_channel_scales(method, fitted_mlp, held_out, calibration, reduce_range, tmp_path):
    model, fp32 = fitted_mlp
    x, _ = held_out
    if method == "dynamic":
        path = ort_dynamic(fp32, tmp_path / "pc.onnx", per_channel=True, reduce_range=reduce_range)
    else:
        path = ort_static(fp32, tmp_path / "pc.onnx", calibration, per_channel=True, reduce_range=reduce_range)
    suffix = "_Transposed" if method == "dynamic" else ""
    check_int8_weights(path, model, suffix=suffix, per_channel=True, reduce_range=reduce_range)
    got = run_onnx(path, {"x": x})
    assert argmax_agreement(got, eager(model, x)) >= 0.95
    check_int8_noise(got, model, path, method, x)


def node_ops(path: Path) -> dict[str, str]:
    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.int8_kernels
@pytest.mark.parametrize("pattern", ["classifier", "^node_linear_2$"])
def test_exclude_keeps_the_last_layer_in_float(pattern, fitted_mlp, held_out, calibration, tmp_path):
    """By module path (what a user knows) or by ONNX node name: the classifier's weight stays fp32."""
    model, fp32 = fitted_mlp
    assert node_ops(fp32)["node_linear_2"] == "Gemm"  # the exporter's name for the classifier's Linear

    dynamic = ort_dynamic(fp32, tmp_path / "dyn.onnx", exclude=[pattern])
    assert quantized_summary(dynamic) == {"MatMul": 1, "MatMulInteger": 2, "DynamicQuantizeLinear": 2}
    assert node_ops(dynamic)["node_linear_2_MatMul"] == "MatMul"  # ONNX Runtime splits a Gemm into MatMul + Add
    tensors = initializers(dynamic)
    assert "classifier.weight_Transposed_quantized" not in tensors and "layers.2.weight_Transposed_quantized" in tensors

    static = ort_static(fp32, tmp_path / "static.onnx", calibration, exclude=[pattern])
    graph = onnx.load(str(static)).graph
    (gemm,) = [n for n in graph.node if n.name == "node_linear_2"]
    assert gemm.op_type == "Gemm" and gemm.input[1] == "classifier.weight"  # the float initializer itself
    np.testing.assert_array_equal(initializers(static)["classifier.weight"], model.classifier.weight.detach().numpy())
    quantized = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert {n.input[0] for n in quantized} >= {"layers.0.weight_quantized", "layers.2.weight_quantized"}
    assert not any(n.input[0].startswith("classifier") for n in quantized)

    x, _ = held_out
    reference = eager(model, x)
    for path in (dynamic, static):
        assert argmax_agreement(run_onnx(path, {"x": x}), reference) >= 0.95


def test_exclude_that_matches_nothing_or_is_no_regex_is_a_user_error(fitted_mlp, calibration, tmp_path):
    fp32 = fitted_mlp[1]
    with pytest.raises(UserError, match=r"deploy.exclude: 'lm_head' matches no ONNX node name or module path"):
        ort_dynamic(fp32, tmp_path / "dyn.onnx", exclude=["classifier", "lm_head"])
    with pytest.raises(UserError, match=r"deploy.exclude: '\[' is not a regular expression"):
        ort_static(fp32, tmp_path / "static.onnx", calibration, exclude=["["])
    assert not (tmp_path / "dyn.onnx").exists() and not (tmp_path / "static.onnx").exists()


@pytest.mark.int8_kernels
def test_llama_dynamic_int8_with_the_embedding_and_lm_head_in_float(llama_onnx, tmp_path):
    model, fp32 = llama_onnx
    assert quantized_summary(fp32) == {"MatMul": 10, "Gather": 1}  # 7 linears + lm_head + 2 attention matmuls
    full = quantized_summary(ort_dynamic(fp32, tmp_path / "all.onnx"))
    kept = quantized_summary(ort_dynamic(fp32, tmp_path / "kept.onnx", exclude=["lm_head", "embed_tokens"]))
    # All 8 weight matmuls int8 (attention's activation x activation matmuls stay float), the embedding int8 too.
    assert full["MatMulInteger"] == 8 and full["MatMul"] == 2 and full["DequantizeLinear"] == 1
    assert kept["MatMulInteger"] == 7 and kept["MatMul"] == 3 and "DequantizeLinear" not in kept
    feeds = lm_feeds(3, 16, seed=5)
    for name in ("all.onnx", "kept.onnx"):
        got = run_onnx(tmp_path / name, {k: v.numpy() for k, v in feeds.items()})
        check_lm_int8_noise(got, model, tmp_path / name, feeds)


@pytest.mark.int8_kernels
def test_llama_static_int8_quantizes_weights_not_attention(llama_onnx, tmp_path):
    """Static QDQ touches only nodes with a stored weight: int8 activations in attention's
    activation x activation matmuls ruined a small LM's perplexity (44 -> 321) before this rule."""
    import onnx

    model, fp32 = llama_onnx
    graph = onnx.load(str(fp32)).graph
    stored = {i.name for i in graph.initializer}
    chosen = set(weight_nodes(onnx.load(str(fp32))))
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert {n.name for n in matmuls if n.input[1] in stored} <= chosen  # every weight matmul
    assert not {n.name for n in matmuls if n.input[1] not in stored} & chosen  # no attention matmul
    assert [n.op_type for n in graph.node if n.name in chosen].count("Gather") == 1  # the embedding table
    feeds = [{k: v.numpy() for k, v in lm_feeds(4, 16, seed=s).items()} for s in range(4)]
    path = ort_static(fp32, tmp_path / "static.onnx", feeds)
    check_lm_int8_noise(run_onnx(path, feeds[0]), model, path, {k: torch.from_numpy(v) for k, v in feeds[0].items()})


def test_a_file_that_is_not_onnx_is_a_user_error(calibration, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("these are not the weights you are looking for\n")
    for call in (
        lambda: ort_dynamic(text, tmp_path / "q.onnx"),
        lambda: ort_static(text, tmp_path / "q.onnx", calibration),
        lambda: quantized_summary(text),
    ):
        with pytest.raises(UserError, match=rf"^'{text}' is not an ONNX model \(\w+\)$"):
            call()
    with pytest.raises(UserError, match=r"ONNX model '.*missing\.onnx' does not exist$"):
        ort_dynamic(tmp_path / "missing.onnx", tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- PyTorch-native int8


@pytest.mark.parametrize("backend", ["torchao", "torch_ao"])
def test_torch_int8_backends(backend, fitted_mlp, held_out):
    model, _ = fitted_mlp
    x, _ = held_out
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, used = torch_int8(model, backend=backend)
    assert used == backend
    assert quantized is not model
    if backend == "torch_ao":
        assert isinstance(quantized.classifier, torch.ao.nn.quantized.dynamic.Linear)
    else:
        assert type(quantized.classifier.weight).__module__.startswith("torchao")  # an int8 tensor subclass
    for key, value in model.state_dict().items():  # the fp32 model is left as it was
        assert type(value) is torch.Tensor and torch.equal(value, before[key]), key

    reference = eager(model, x)
    got = eager(quantized, x)
    assert argmax_agreement(got, reference) >= 0.95
    assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
    assert not np.array_equal(got, reference)  # it really computes in int8


def test_torch_int8_auto_picks_torch_ao_on_cpu_and_torchao_without_it(fitted_mlp, monkeypatch):
    from distilflow.deploy import quantize

    assert torch_int8(fitted_mlp[0], backend="auto")[1] == "torch_ao"
    monkeypatch.setattr(quantize, "_has_torch_ao", lambda: False)
    assert torch_int8(fitted_mlp[0], backend="auto")[1] == "torchao"
    with pytest.raises(UserError, match="no torch.ao.quantization"):
        torch_int8(fitted_mlp[0], backend="torch_ao")
