"""Models: the zoo, builders and cost counters, feature taps, projection heads."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from distilflow.config import CNNConfig, FactoryConfig, MLPConfig, ModelConfig
from distilflow.errors import UserError
from distilflow.models.build import build_model, count_macs, count_params
from distilflow.models.heads import build_head
from distilflow.models.taps import Taps, resolve
from distilflow.models.zoo import CNN, MLP


def x_of(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- zoo


def test_mlp_shapes_and_layer_paths():
    model = MLP((2, 5), 3, [8, 6])
    assert model(x_of(4, 2, 5)).shape == (4, 3)
    names = [n for n, _ in model.named_modules()]
    assert names == ["", "layers", "layers.0", "layers.1", "layers.2", "layers.3", "dropout", "classifier"]
    assert isinstance(model.layers[1], nn.ReLU) and model.layers[0].in_features == 10


@pytest.mark.parametrize(
    "input_shape, dims, batch_shape",
    [((12,), 1, (4, 12)), ((2, 12), 1, (4, 2, 12)), ((6, 6), 2, (4, 6, 6)), ((3, 6, 6), 2, (4, 3, 6, 6))],
)
def test_cnn_shapes(input_shape, dims, batch_shape):
    model = CNN(input_shape, 5, [4, 5, 6], kernel_size=3, dims=dims)
    assert model(x_of(*batch_shape)).shape == (4, 5)
    assert model.classifier.in_features == 6


def test_cnn_rejects_wrong_input_rank():
    with pytest.raises(ValueError, match="2-D CNN needs inputs of 2 or 3 dims"):
        CNN((40,), 3, [4], dims=2)


def test_batchnorm_uses_pytorch_momentum_convention():
    model = CNN((12,), 3, [4], kernel_size=3)
    assert model.features[1].momentum == 0.1  # PyTorch default; not TensorFlow's 0.99


# ---------------------------------------------------------------- cost


def test_count_params_by_hand():
    # MLP 10 -> 8 -> 6 -> 3: weights + biases
    assert count_params(MLP((10,), 3, [8, 6])) == (10 * 8 + 8) + (8 * 6 + 6) + (6 * 3 + 3)
    # CNN1d: conv(1->4, k3) + bn(4) + conv(4->5, k3) + bn(5) + linear(5->3)
    cnn = CNN((12,), 3, [4, 5], kernel_size=3)
    assert count_params(cnn) == (1 * 4 * 3 + 4) + 2 * 4 + (4 * 5 * 3 + 5) + 2 * 5 + (5 * 3 + 3)


def test_count_macs_mlp_is_sum_of_in_times_out():
    model = MLP((10,), 3, [8, 6])
    assert count_macs(model, x_of(4, 10)) == 10 * 8 + 8 * 6 + 6 * 3  # 146, per sample
    assert count_macs(model, x_of(1, 10)) == 146


@pytest.mark.parametrize(
    "length, expected",
    [
        # conv1: out_len 12 * cout 4 * cin 1 * k 3; pool -> 6; conv2: 6 * 5 * 4 * 3; linear 5 * 3
        (12, 12 * 4 * 1 * 3 + 6 * 5 * 4 * 3 + 5 * 3),
        # odd length: pooling floors 7 -> 3
        (7, 7 * 4 * 1 * 3 + 3 * 5 * 4 * 3 + 5 * 3),
    ],
)
def test_count_macs_cnn1d_by_hand(length, expected):
    model = CNN((length,), 3, [4, 5], kernel_size=3)
    model.train()
    assert count_macs(model, x_of(2, length)) == expected
    assert model.training  # the mode is restored


def test_count_macs_cnn2d_by_hand():
    model = CNN((2, 6, 6), 3, [4, 5], kernel_size=3, dims=2)
    model.eval()
    assert count_macs(model, x_of(3, 2, 6, 6)) == 36 * 4 * 2 * 9 + 9 * 5 * 4 * 9 + 5 * 3
    assert not model.training


# ---------------------------------------------------------------- build_model


@pytest.mark.parametrize(
    "arch, input_shape, batch_shape",
    [("mlp", (12,), (3, 12)), ("cnn1d", (12,), (3, 12)), ("cnn2d", (1, 6, 6), (3, 1, 6, 6))],
)
def test_build_builtin_models(arch, input_shape, batch_shape):
    section = {"mlp": MLPConfig(hidden=[7])} if arch == "mlp" else {"cnn": CNNConfig(channels=[4, 4], kernel_size=3)}
    cfg = ModelConfig(arch=arch, **section)
    model = build_model(cfg, input_shape, 5, "student")
    assert model(x_of(*batch_shape)).shape == (3, 5)
    if arch == "mlp":
        assert isinstance(model, MLP) and model.layers[0].out_features == 7
    else:
        assert isinstance(model, CNN) and model.dims == (1 if arch == "cnn1d" else 2)


def test_build_cnn_with_wrong_input_is_a_user_error():
    with pytest.raises(UserError, match="teacher.model.arch 'cnn2d'.*2-D CNN"):
        build_model(ModelConfig(arch="cnn2d"), (40,), 10, "teacher")


USER_MODULE = """
import torch
from torch import nn


def make(input_shape, num_classes, width=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))


def fixed():
    return nn.Linear(3, 2)


def not_a_module(input_shape, num_classes):
    return "a string"


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"distilflow_test_user_models_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_build_model_from_user_factory(user_module):
    model = build_model(ModelConfig(arch=f"{user_module}:make"), (6,), 3, "student")
    assert model(x_of(2, 6)).shape == (2, 3)
    assert model[1].out_features == 4
    model = build_model(
        ModelConfig(arch=f"{user_module}:make", factory=FactoryConfig({"width": 9})), (6,), 3, "student"
    )
    assert model[1].out_features == 9
    # A factory without input_shape/num_classes parameters is called without them.
    model = build_model(ModelConfig(arch=f"{user_module}:fixed"), (6,), 3, "student")
    assert isinstance(model, nn.Linear) and model.in_features == 3


@pytest.mark.parametrize(
    "arch, message",
    [
        ("resnet18", r"student\.model\.arch 'resnet18' is not allowed; use a built-in name or 'module\.path:factory'"),
        ("no_such_module_zz_123:make", r"cannot import module 'no_such_module_zz_123'"),
        ("{mod}:missing", r"module '{mod}' has no attribute 'missing'"),
        ("{mod}:not_a_module", r"'{mod}:not_a_module' returned str, not a torch\.nn\.Module"),
    ],
)
def test_build_model_errors(user_module, arch, message):
    with pytest.raises(UserError, match=message.format(mod=user_module)):
        build_model(ModelConfig(arch=arch.format(mod=user_module)), (6,), 3, "student")


def test_build_model_bad_kwargs(user_module):
    with pytest.raises(
        UserError,
        match=r"failed when called with \['depth', 'input_shape', 'num_classes'\]: TypeError: .*unexpected .*'depth'",
    ):
        build_model(ModelConfig(arch=f"{user_module}:make", factory=FactoryConfig({"depth": 2})), (6,), 3, "student")


# ---------------------------------------------------------------- taps


def hooks_everywhere(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_taps_capture_outputs_by_path():
    torch.manual_seed(0)
    model = MLP((10,), 3, [8, 6]).eval()
    x = x_of(4, 10)
    plain = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    taps = Taps(model, ["layers.3", "layers.1"], "student")
    with taps.capture() as captured:
        logits = model(x)
    h1 = torch.relu(model.layers[0](x))
    h2 = torch.relu(model.layers[2](h1))
    torch.testing.assert_close(captured[0], h2)
    torch.testing.assert_close(captured[1], h1)
    assert [f.shape for f in taps.features()] == [(4, 6), (4, 8)]
    # The model is untouched: same output, same weights, no hooks left behind.
    torch.testing.assert_close(logits, plain)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert hooks_everywhere(model) == 0


def test_taps_on_cnn_pool_and_first_block():
    torch.manual_seed(0)
    model = CNN((12,), 3, [4, 5], kernel_size=3).eval()
    x = x_of(2, 12)
    taps = Taps(model, ["pool", "features.2"], "teacher")
    with taps.capture():
        model(x)
    pool, block = taps.features()
    torch.testing.assert_close(pool, model.features(x.unsqueeze(1)).mean(-1))
    torch.testing.assert_close(block, torch.relu(model.features[1](model.features[0](x.unsqueeze(1)))))
    assert pool.shape == (2, 5) and block.shape == (2, 4, 12)


def test_taps_remove_hooks_after_an_error():
    model = MLP((10,), 3, [8])
    taps = Taps(model, ["layers.0"], "student")
    with pytest.raises(RuntimeError):
        with taps.capture():
            model(x_of(2, 11))  # wrong width
    assert hooks_everywhere(model) == 0
    # Outside the block nothing is captured.
    model(x_of(2, 10))
    assert taps.captured == [None]


def test_taps_unknown_path_lists_close_paths():
    model = MLP((10,), 3, [8, 6])
    with pytest.raises(UserError) as err:
        Taps(model, ["layers.9"], "student")
    msg = str(err.value)
    assert "student has no module 'layers.9'" in msg
    close = msg.split("closest module paths: ")[1].split(", ")
    assert 1 <= len(close) <= 5 and all(c in dict(model.named_modules()) for c in close)
    assert any(c.startswith("layers.") for c in close)
    with pytest.raises(UserError, match="teacher has no module ''"):
        resolve(model, "", "teacher")
    assert resolve(model, "classifier", "student") is model.classifier


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.pair = PairOut()
        self.dictionary = DictOut()

    def forward(self, x):
        self.dictionary(x)
        return self.pair(self.used(x))[0]


class PairOut(nn.Module):
    def forward(self, x):
        return x * 2, x * 3  # like a HF decoder layer: (hidden, extras)


class DictOut(nn.Module):
    def forward(self, x):
        return {"x": x}


def test_taps_tuple_outputs_and_modules_that_did_not_run():
    model = TwoHeads()
    x = x_of(2, 3)
    taps = Taps(model, ["pair", "unused"], "student")
    with taps.capture() as captured:
        model(x)
    torch.testing.assert_close(captured[0], model.used(x) * 2)
    with pytest.raises(UserError, match=r"tapped modules \[1\] did not run"):
        taps.features()
    with pytest.raises(UserError, match="returned dict, not a tensor"):
        with Taps(model, ["dictionary"], "student").capture():
            model(x)
    assert hooks_everywhere(model) == 0


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "student, teacher, per_token, kind",
    [
        ((6,), (6,), False, nn.Identity),
        ((4, 10), (4, 10), False, nn.Identity),
        ((5,), (7,), False, nn.Linear),
        ((3, 10), (6, 10), False, nn.Conv1d),
        ((3, 4, 4), (6, 4, 4), False, nn.Conv2d),
        ((5,), (2, 3, 4), False, nn.Sequential),  # vector -> conv map
        ((5,), (4, 10), False, nn.Sequential),
        ((3, 10), (7,), False, nn.Sequential),  # conv map -> vector
        ((3, 4, 4), (7,), False, nn.Sequential),
        ((4, 3), (4, 6), True, nn.Linear),  # tokens (T, d_s) -> (T, d_t)
        ((4, 6), (4, 6), True, nn.Identity),
    ],
)
def test_build_head_maps_student_shape_to_teacher_shape(student, teacher, per_token, kind):
    head = build_head(student, teacher, per_token=per_token, name="s -> t")
    assert type(head) is kind
    out = head(torch.randn(2, *student))
    assert out.shape == (2, *teacher)


def test_head_details():
    conv = build_head((3, 10), (6, 10), per_token=False, name="a -> b")
    assert conv.kernel_size == (1,) and conv.in_channels == 3 and conv.out_channels == 6
    to_map = build_head((5,), (2, 3, 4), per_token=False, name="a -> b")
    assert isinstance(to_map[0], nn.Linear) and to_map[0].out_features == 24 and isinstance(to_map[1], nn.Unflatten)
    to_vec = build_head((3, 10), (7,), per_token=False, name="a -> b")
    assert isinstance(to_vec[0], nn.Flatten) and to_vec[1].in_features == 30
    token = build_head((4, 3), (4, 6), per_token=True, name="a -> b")
    assert token.in_features == 3 and token.out_features == 6
    # a per-token head works for any sequence length at run time
    assert token(torch.randn(2, 9, 3)).shape == (2, 9, 6)


@pytest.mark.parametrize("student, teacher", [((3, 10), (6, 5)), ((3, 4, 4), (6, 2, 2)), ((3, 10), (6, 4, 4))])
def test_build_head_refuses_conv_maps_of_different_spatial_size(student, teacher):
    with pytest.raises(UserError) as err:
        build_head(student, teacher, per_token=False, name="features.2 -> features.8")
    msg = str(err.value)
    assert "features.2 -> features.8" in msg and str(student) in msg and str(teacher) in msg
    assert "allowed:" in msg


@pytest.mark.parametrize("student, teacher", [((4, 3), (5, 6)), ((3,), (6,)), ((4, 3, 2), (4, 6, 2))])
def test_build_head_per_token_needs_equal_sequence_lengths(student, teacher):
    with pytest.raises(UserError, match=r"token features must both be \(seq_len, width\) with the same seq_len"):
        build_head(student, teacher, per_token=True, name="layers.3 -> layers.10")


@pytest.mark.parametrize("dims", [1, 2])
def test_a_conv_bias_before_batchnorm_gets_an_exact_zero_gradient(dims):
    """The CNN's output is torch's Conv + BatchNorm stack's with the same weights; the conv biases (which
    the norm cancels) get a gradient of exactly 0, the other parameters torch's own gradients."""
    from distilflow.models.zoo import CNN

    torch.manual_seed(0)
    model = CNN((2, 12) if dims == 1 else (2, 6, 6), 3, [4, 4], dims=dims)
    conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
    plain = nn.Sequential(conv(2, 4, 5, padding=2), norm(4), nn.ReLU())
    plain.load_state_dict({k: v for k, v in model.features[:3].state_dict().items()})
    with torch.no_grad():
        model.features[0].bias.uniform_(-1, 1)
        plain[0].bias.copy_(model.features[0].bias)
    x = torch.randn(5, 2, 12) if dims == 1 else torch.randn(5, 2, 6, 6)
    ours, reference = model.features[:3](x), plain(x)
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    (ours * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.equal(model.features[0].bias.grad.abs(), torch.zeros(4))
    assert plain[0].bias.grad.abs().max() < 1e-4  # torch's: zero up to rounding (the noise AdamW would amplify)
    assert torch.allclose(model.features[0].weight.grad, plain[0].weight.grad, atol=1e-4, rtol=1e-5)
