"""Mixed precision, the fp16 gradient scaler, gradient checkpointing, teacher dtype and peak memory.

Tolerances. bf16 keeps 8 significant bits (7 stored + 1 implicit): rounding an input costs up to
2**-8 = 0.39 % relative error. Under autocast each matmul rounds both operands to bf16 and
accumulates in float32, so a product carries up to ~2 * 2**-8 and a two-layer forward + backward
chain a few times that. fp16 keeps 11 bits (2**-11 = 0.049 % per rounding).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distilflow.cli import main
from distilflow.config import KDWeightConfig, TrainConfig
from distilflow.data.stdlib_corpus import tiny_llama_config
from distilflow.errors import UserError
from distilflow.losses.objective import IGNORE_INDEX, Objective, Outputs, Targets
from distilflow.models.hf import build_causal_lm
from distilflow.models.zoo import CNN, MLP
from distilflow.schedules import Phase
from distilflow.tasks.causal_lm import CausalLMTask, lm_logits
from distilflow.tasks.classify import ClassifierTask
from distilflow.teachers.live import LiveTeacher
from distilflow.train.checkpoint import CHECKPOINT, read_checkpoint
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import NonFiniteLoss, fit
from distilflow.train.precision import (
    MAX_SKIPPED,
    Precision,
    cast_teacher,
    is_gradient_checkpointing,
    peak_memory,
    reset_peak_memory,
    set_gradient_checkpointing,
)

from .poison import PoisonGrad

CPU = torch.device("cpu")
WIDTH, CLASSES = 24, 3
BF16_UNIT = 2.0**-8  # relative rounding error of one bf16 rounding
FP16_UNIT = 2.0**-11


def _data(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _task(grad_accum: int = 1) -> ClassifierTask:
    x, y = _data()
    test_x, test_y = _data(16, seed=1)
    return ClassifierTask(x, y, test_x=test_x, test_y=test_y, batch_size=8, grad_accum=grad_accum, seed=3, device=CPU)


def _supervised(steps: int) -> Objective:
    return Objective([Phase("supervised", 0, steps, ("ce",))], total_steps=steps, ce_weight=1.0)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((WIDTH,), CLASSES, [32, 32], dropout=0.0)


def _train(precision: str = "fp32", steps: int = 4, **kw) -> TrainConfig:
    # Constant learning rate (no warm-up, min_lr = lr), so a run of N steps is a prefix of a longer one.
    base = dict(steps=steps, batch_size=8, lr=1e-2, min_lr=1e-2, warmup_steps=0, eval_every=0, log_every=1)
    return TrainConfig(**{**base, "checkpoint_every": steps, "precision": precision, **kw})


def _fit(model, task, train: TrainConfig, run_dir: Path, objective=None, **extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, "student", tensorboard=False)
    try:
        return fit(
            stage="student",
            model=model,
            objective=objective or _supervised(train.steps),
            task=task,
            train=train,
            stage_dir=run_dir / "student",
            log=log,
            config={"test": True},
            **extra,
        )
    finally:
        log.close()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- bf16 against fp32


def _kd_step(precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """Loss and gradients of one KD + CE step of a tiny Llama student under ``precision``."""
    torch.manual_seed(0)
    teacher = build_causal_lm(tiny_llama_config(64, hidden=32, layers=2, max_positions=32)).eval()
    torch.manual_seed(1)
    student = build_causal_lm(tiny_llama_config(64, hidden=16, layers=2, max_positions=32))
    g = torch.Generator().manual_seed(2)
    batch = {
        "input_ids": torch.randint(3, 64, (4, 16), generator=g),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
    }
    labels = batch["input_ids"][:, 1:]
    objective = Objective(
        [Phase("joint", 0, 1, ("kd", "ce"))],
        total_steps=1,
        kd_schedule=KDWeightConfig(schedule="constant", base_weight=0.7),
        temperature=2.0,
        ce_weight=0.5,
        per_token=True,
    )
    targets = Targets(labels=labels, kd_mask=labels != IGNORE_INDEX)
    amp = Precision(precision, CPU)
    with amp.autocast():
        with torch.no_grad():
            teacher_logits = lm_logits(teacher, batch)
        student_logits = lm_logits(student, batch)
        loss, _ = objective(0, Outputs(student_logits), Outputs(teacher_logits), targets, targets.counts(True))
    amp.backward(loss)
    return loss.detach(), _grads(student), student_logits.dtype


def test_a_bf16_step_equals_the_fp32_step_within_bf16_rounding():
    loss32, grads32, dtype32 = _kd_step("fp32")
    loss16, grads16, dtype16 = _kd_step("bf16")
    assert dtype32 == torch.float32 and dtype16 == torch.bfloat16  # autocast really ran the matmuls in bf16
    assert loss16.dtype == torch.float32  # the loss math stays float32
    # The loss is a mean of per-token log-probabilities of bf16 logits: each logit is one rounding (2**-8)
    # of values of size ~1, and the mean averages those errors; 4 units is a loose bound.
    assert abs(float(loss16 - loss32)) <= 4 * BF16_UNIT * abs(float(loss32))
    # Gradients pass through two decoder layers (attention + MLP: about 6 matmuls in a row, each with
    # ~2 roundings, forward and backward): 16 units (6.25 %) in norm. They must differ (bf16 was used).
    rel = _rel(grads16, grads32)
    assert 0 < rel <= 16 * BF16_UNIT, rel


def test_bf16_training_through_the_loop_follows_fp32(tmp_path):
    """Same data and init: the logged loss and gradient norm of every step stay within bf16 rounding."""
    _fit(_mlp(), _task(), _train("fp32"), tmp_path / "fp32")
    _fit(_mlp(), _task(), _train("bf16"), tmp_path / "bf16")
    fp32, bf16 = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert len(fp32) == len(bf16) == 4
    for a, b in zip(fp32, bf16):
        assert a["loss"] != b["loss"]
        # Two hidden layers: ~3 matmuls with 2 roundings each; AdamW's first steps move weights by ~lr,
        # so the trajectories stay close; 8 units for the loss, 16 for the gradient norm.
        assert abs(a["loss"] - b["loss"]) <= 8 * BF16_UNIT * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 16 * BF16_UNIT * a["grad_norm"], (a, b)


def _kill_at(task, step: int):
    class Killed(Exception):
        pass

    class KillAt:
        def __getattr__(self, name):
            return getattr(task, name)

        def micro_batches(self, s: int):
            if s >= step:
                raise Killed(s)
            return task.micro_batches(s)

    return KillAt(), Killed


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_bit_exact_in_mixed_precision(tmp_path, precision):
    """Killed after the checkpoint at step 3 and resumed: the same weights, optimizer and logged rows
    (fp16 on CPU here only to exercise the scaler state; the CLI refuses fp16 on CPU)."""
    train = _train(precision, steps=6, checkpoint_every=3)
    straight = _mlp()
    _fit(straight, _task(), train, tmp_path / "straight")

    task, killed = _kill_at(_task(), 4)
    with pytest.raises(killed):
        _fit(_mlp(), task, train, tmp_path / "resumed")
    state = read_checkpoint(tmp_path / "resumed" / "student" / CHECKPOINT)
    assert state["step"] == 3
    if precision == "fp16":
        assert state["precision"]["scaler"]["scale"] > 0
    torch.manual_seed(999)  # another process, another global RNG state
    resumed = _mlp()
    _fit(resumed, _task(), train, tmp_path / "resumed")
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    drop = ("samples_per_s",)
    ref = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "straight")]
    got = [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "resumed")]
    assert got == ref


# ---------------------------------------------------------------- fp16 and the gradient scaler (on CPU, for the test)


def test_an_overflowing_fp16_step_is_skipped_not_a_nan_stop(tmp_path):
    """Step 3 overflows: the scaler skips it (weights and AdamW state untouched, scale halved), and the
    run goes on. Reference: the same run stopped after 2 steps has exactly the same weights at step 3."""
    skipped = _mlp()
    _fit(skipped, PoisonGrad(_task(), {2}), _train("fp16", steps=3), tmp_path / "skipped")
    two = _mlp()
    _fit(two, _task(), _train("fp16", steps=2), tmp_path / "two")
    for name, value in two.state_dict().items():
        assert torch.equal(skipped.state_dict()[name], value), name
    rows = _rows(tmp_path / "skipped")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1]
    assert rows[2]["loss_scale"] == rows[1]["loss_scale"] / 2  # backoff factor 0.5
    assert not np.isfinite(rows[2]["grad_norm"])  # inf gradients through ReLU layers: inf or nan


def test_fp16_gradients_are_unscaled_before_the_norm_and_clipping(tmp_path):
    """The logged gradient norm (the one clipping uses) equals fp32's within fp16 rounding, not
    loss_scale (65,536) times it."""
    _fit(_mlp(), _task(), _train("fp32", grad_clip=0.05), tmp_path / "fp32")
    _fit(_mlp(), _task(), _train("fp16", grad_clip=0.05), tmp_path / "fp16")
    fp32, fp16 = _rows(tmp_path / "fp32"), _rows(tmp_path / "fp16")
    assert all(r["loss_scale"] > 1000 for r in fp16)
    for a, b in zip(fp32, fp16):
        assert b["skipped_steps"] == 0
        # Three matmuls with ~2 roundings each, forward and backward: 16 fp16 units (0.8 %).
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 16 * FP16_UNIT * a["grad_norm"], (a, b)


def test_gradients_that_overflow_at_every_scale_stop_the_run(tmp_path):
    task = PoisonGrad(_task(), set(range(100)))
    with pytest.raises(
        NonFiniteLoss, match=rf"student step {MAX_SKIPPED}: gradient norm \(after {MAX_SKIPPED} skipped"
    ):
        _fit(_mlp(), task, _train("fp16", steps=MAX_SKIPPED + 5), tmp_path / "fp16")
    # fp32 has no scaler: a non-finite gradient norm is a bad step; with max_bad_steps 1 the first stops.
    with pytest.raises(NonFiniteLoss, match=r"student step 1: gradient norm is (inf|nan) "):
        _fit(_mlp(), PoisonGrad(_task(), {0}), _train("fp32", steps=3, max_bad_steps=1), tmp_path / "fp32")


# ---------------------------------------------------------------- gradient checkpointing


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return build_causal_lm(tiny_llama_config(64, hidden=32, layers=3, max_positions=32))


def _lm_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 64, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}


def _lm_grads(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
    calls = []
    # The layer's attention runs again when the backward pass recomputes the layer (transformers checkpoints
    # the layer's forward, so a hook on the layer itself would not see it; a pre-hook on an early submodule
    # does, since torch may stop the recomputation once the last saved tensor is rebuilt).
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    logits = lm_logits(model, batch)
    labels = batch["labels"][:, 1:]
    loss = nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    handle.remove()
    return _grads(model), len(calls)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = _lm_batch()
    plain, plain_calls = _lm_grads(_tiny_llama(), batch)
    model = _tiny_llama()
    set_gradient_checkpointing(model, True)
    checkpointed, calls = _lm_grads(model, batch)
    assert plain_calls == 1 and calls == 2  # the layer really ran again in the backward pass
    # Recomputation runs the same float32 kernels on the same inputs: equal up to summation order.
    assert torch.allclose(checkpointed, plain, rtol=1e-5, atol=1e-7)
    set_gradient_checkpointing(model, False)
    assert _lm_grads(model, batch)[1] == 1


def test_gradient_checkpointing_through_the_loop(tmp_path):
    batch = _lm_batch()
    train_rows = {k: v.repeat(4, 1) for k, v in batch.items()}

    def task():
        return CausalLMTask(train_rows, batch, batch_size=4, grad_accum=2, seed=0, device=CPU)

    plain, checkpointed = _tiny_llama(), _tiny_llama()
    _fit(plain, task(), _train(steps=3, lr=1e-3, min_lr=1e-3), tmp_path / "plain")
    _fit(checkpointed, task(), _train(steps=3, lr=1e-3, min_lr=1e-3, gradient_checkpointing=True), tmp_path / "gc")
    assert not is_gradient_checkpointing(checkpointed)  # switched off again after training
    for name, value in plain.state_dict().items():
        assert torch.allclose(checkpointed.state_dict()[name], value, rtol=1e-5, atol=1e-6), name


def test_gradient_checkpointing_of_a_classifier_is_refused_by_the_loop(tmp_path):
    with pytest.raises(UserError, match=r"'student.train.gradient_checkpointing': true is not allowed for MLP"):
        _fit(_mlp(), _task(), _train(gradient_checkpointing=True), tmp_path)


# ---------------------------------------------------------------- teacher dtype


def test_a_cast_classifier_teacher_runs_in_bf16_on_float32_inputs():
    torch.manual_seed(0)
    teacher = CNN((WIDTH,), CLASSES, [4, 4], kernel_size=3).eval()
    x, _ = _data(16)
    with torch.no_grad():
        reference = teacher(x)
    assert cast_teacher(teacher, "bfloat16") is teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    out = LiveTeacher(teacher, _task(), None)({"x": x}, features=False)
    assert out.logits.dtype == torch.bfloat16
    # Two conv blocks and a linear layer, ~2 roundings each, relative to the largest logit.
    assert float((out.logits.float() - reference).abs().max()) <= 12 * BF16_UNIT * float(reference.abs().max())
    assert cast_teacher(teacher, "bfloat16") is teacher  # already cast: no second input hook
    assert len(teacher._forward_pre_hooks) == 1


# ---------------------------------------------------------------- peak memory


def test_peak_rss_is_measured_and_resettable():
    scope = reset_peak_memory(CPU)
    before = peak_memory(CPU)["peak_rss_bytes"]
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    during = peak_memory(CPU)["peak_rss_bytes"]
    assert during >= before + 60 * 2**20
    del block
    assert scope in ("stage", "process")
    if scope == "stage":  # Linux allowed the reset: the block is no longer in the new window's peak
        reset_peak_memory(CPU)
        assert peak_memory(CPU)["peak_rss_bytes"] < during - 32 * 2**20


# ---------------------------------------------------------------- the CLI: refusals before anything is written


ERROR = "distilflow: error: "

REFUSED = [
    (["student.train.precision=fp16"], "'student.train.precision': 'fp16' is not allowed on device cpu"),
    (["teacher.train.precision=fp16"], "'teacher.train.precision': 'fp16' is not allowed on device cpu"),
    (["teacher.model.dtype=float16"], "'teacher.model.dtype': 'float16' is not allowed on device cpu"),
    (["student.train.gradient_checkpointing=true"], "'student.train.gradient_checkpointing': true is not allowed"),
    # Students keep float32 weights (student.train.precision is their low-precision compute): no such key.
    (["student.model.dtype=bfloat16"], "unknown config key 'student.model.dtype'"),
    (["student.train.precision=fp8"], "student.train.precision"),
]


@pytest.mark.parametrize(("extra", "expected"), REFUSED, ids=lambda v: str(v)[:40])
def test_refused_before_anything_is_written(tmp_path, tiny_overrides, capsys, extra, expected):
    out = tmp_path / "run"
    assert main(["run", *tiny_overrides(out), *extra, "--no-tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(ERROR) and err.count("\n") == 1, err
    assert expected in err
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- end to end: bf16 everywhere, peak memory per stage


def test_bf16_run_reports_peak_memory_per_stage(tmp_path, tiny_overrides, monkeypatch):
    import distilflow.teacher_signals as teacher_signals

    seen = []

    class Recording(LiveTeacher):
        def __init__(self, model, task, taps):
            seen.append(next(model.parameters()).dtype)
            super().__init__(model, task, taps)

    monkeypatch.setattr(teacher_signals, "LiveTeacher", Recording)
    out = tmp_path / "run"
    extra = ["student.train.precision=bf16", "teacher.train.precision=bf16", "teacher.model.dtype=bfloat16"]
    assert main(["run", *tiny_overrides(out), *extra, "--no-tensorboard"]) == 0
    assert seen == [torch.bfloat16]  # the trained teacher was cast for the distillation passes
    results = json.loads((out / "results.json").read_text())
    for stage in ("teacher", "baseline", "student"):
        r = results[stage]
        on_disk = json.loads((out / stage / "result.json").read_text())
        assert on_disk["peak_rss_bytes"] == r["peak_rss_bytes"]
        assert r["peak_rss_scope"] in ("stage", "process")
        # The process holds the interpreter, torch and the models: far more than the weights alone.
        assert r["peak_rss_bytes"] > 4 * r["params"] + 50 * 2**20, stage
        assert 0 <= r["accuracy"] <= 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_lm_run_with_bf16_checkpointing_and_a_bf16_hf_config_teacher(tmp_path, tiny_lm_args, monkeypatch):
    import distilflow.teacher_signals as teacher_signals

    seen = []

    class Recording(LiveTeacher):
        def __init__(self, model, task, taps):
            seen.append(next(model.parameters()).dtype)
            super().__init__(model, task, taps)

    monkeypatch.setattr(teacher_signals, "LiveTeacher", Recording)
    extra = [
        "teacher.model.dtype=bfloat16",
        "student.train.precision=bf16",
        "student.train.gradient_checkpointing=true",
        "teacher.train.gradient_checkpointing=true",
        "deploy.enabled=false",
    ]
    assert main(["run", *tiny_lm_args(tmp_path), *extra, "--no-tensorboard"]) == 0
    assert seen == [torch.bfloat16]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for stage in ("teacher", "baseline", "student"):
        assert results[stage]["peak_rss_bytes"] > 50 * 2**20
        assert np.isfinite(results[stage]["perplexity"])
    # The saved student is float32 (master weights) and loads without a trace of checkpointing.
    config = json.loads((tmp_path / "run" / "student" / "hf" / "config.json").read_text())
    assert re.fullmatch(r"float32", str(config.get("dtype", config.get("torch_dtype"))))


@pytest.mark.parametrize("loss_impl", ["plain", "fused"])
def test_a_cached_teacher_under_bf16(tmp_path, tiny_lm_args, loss_impl):
    """The cache reader runs outside autocast (its fp16 top-k log-probs are data, not compute), the
    student and the sparse loss under it; the run finishes with finite perplexities."""
    extra = [
        "cache.use=true",
        "cache.k=8",
        "student.train.precision=bf16",
        f"distill.loss_impl={loss_impl}",
        "distill.layer_map=null",
        "distill.phases=[{name: kd, fraction: 1.0, terms: [kd, ce]}]",
        "deploy.enabled=false",
    ]
    assert main(["run", *tiny_lm_args(tmp_path), *extra, "--no-tensorboard"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert np.isfinite(results["student"]["perplexity"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows if r.get("stage") == "student" and "kd" in r]
    assert kd and all(np.isfinite(v) and v >= 0 for v in kd)
