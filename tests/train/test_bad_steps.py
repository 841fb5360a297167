"""Bad steps: a NaN/inf loss or gradient skips the step and counts it; only max_bad_steps in a row stop.

The reference for "skipped" is an independent plain loop (AdamW over the same batches at the same
learning rates, leaving the bad steps out), not the loop under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from distilflow.config import TrainConfig
from distilflow.losses.objective import Objective
from distilflow.models.zoo import MLP
from distilflow.schedules import Phase, lr_at
from distilflow.tasks.classify import ClassifierTask
from distilflow.train.checkpoint import CHECKPOINT, read_checkpoint
from distilflow.train.logging import MetricsLog
from distilflow.train.loop import NonFiniteLoss, fit
from distilflow.train.precision import Precision

from .poison import PoisonGrad, PoisonLoss

CPU = torch.device("cpu")
WIDTH, CLASSES = 12, 3


def _task() -> ClassifierTask:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, WIDTH, generator=g), torch.randint(0, CLASSES, (48,), generator=g)
    return ClassifierTask(x, y, test_x=x[:8], test_y=y[:8], batch_size=8, grad_accum=1, seed=3, device=CPU)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return MLP((WIDTH,), CLASSES, [16], dropout=0.0)


def _train(steps: int, **kw) -> TrainConfig:
    base = dict(steps=steps, batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, log_every=1)
    return TrainConfig(**{**base, "checkpoint_every": 2, **kw})


def _objective(steps: int) -> Objective:
    return Objective([Phase("supervised", 0, steps, ("ce",))], total_steps=steps, ce_weight=1.0)


def _fit(model, task, train, run_dir: Path, stage: str = "student"):
    run_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(run_dir, stage, tensorboard=False)
    try:
        return fit(
            stage=stage,
            model=model,
            objective=_objective(train.steps),
            task=task,
            train=train,
            stage_dir=run_dir / stage,
            log=log,
            config={},
        )
    finally:
        log.close()


def _rows(run_dir: Path) -> list[dict]:
    """The training rows (no evaluation rows), throughput left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows if "eval_accuracy" not in r]


def _plain_loop(train: TrainConfig, left_out: set[int]) -> nn.Module:
    """AdamW on the batches of the steps not ``left_out``, at the loop's learning rate of each step,
    cross-entropy averaged over the batch, gradient norm clipped: written out, not the loop under test."""
    model, task = _mlp(), _task()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    for step in range(train.steps):
        if step in left_out:
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(
                step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps, total_steps=train.steps
            )
        (batch,) = task.micro_batches(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(batch["x"]), batch["y"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
    return model


@pytest.mark.parametrize("poison", [PoisonLoss, PoisonGrad], ids=["nan-loss", "inf-gradient"])
def test_isolated_bad_steps_are_skipped_and_counted(tmp_path, capsys, poison):
    train = _train(8)
    model = _mlp()
    result = _fit(model, poison(_task(), {2, 5}), train, tmp_path)
    reference = _plain_loop(train, left_out={2, 5})
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    assert result.bad_steps == 2
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    what = "loss" if poison is PoisonLoss else "gradient norm"
    bad = [r for r in rows if "bad_step" in r]
    assert [(r["step"], r["bad_step"], r["bad_steps"], r["bad_in_a_row"]) for r in bad] == [
        (3, what, 1, 1),
        (6, what, 2, 1),
    ]
    assert all("loss" not in r for r in bad)  # no NaN in the JSON
    assert all(math.isfinite(r["loss"]) for r in rows if "bad_step" not in r)
    err = capsys.readouterr().err
    assert f"student step 3: {what} is " in err and "the step is skipped (1 in a row, 1 in this stage" in err


def test_max_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    train = _train(10, max_bad_steps=3)
    with pytest.raises(NonFiniteLoss) as info:
        _fit(_mlp(), PoisonLoss(_task(), set(range(3, 10))), train, tmp_path, stage="baseline")
    message = str(info.value)
    ckpt = tmp_path / "baseline" / CHECKPOINT
    assert message.startswith("baseline step 6: loss is nan (ce=nan), 3 bad steps in a row; stopped, ")
    assert f"last good checkpoint kept at {ckpt}" in message
    assert "Likely causes: " in message and "student.train.lr" in message and "NaN, inf or extreme values" in message
    # The checkpoint of step 4 holds the weights after the last good step (3): bad steps change nothing.
    state = read_checkpoint(ckpt)
    assert state["step"] == 4 and state["bad_steps"] == {"total": 1, "in_a_row": 1}
    reference = _plain_loop(train, left_out=set(range(3, 10)))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-6, atol=1e-7)


def test_a_bad_teacher_signal_names_the_teacher_first():
    from distilflow.train.bad_steps import likely_causes

    assert likely_causes({"kd": math.nan, "ce": 1.2}, "student.train.lr").startswith("the teacher's outputs (kd")
    assert likely_causes({"ce": math.inf}, "teacher.train.lr").startswith("a learning rate too high")


def test_the_count_in_a_row_survives_a_resume(tmp_path):
    """Steps 2, 3, 4 (0-based) are bad, the limit 3. Killed at the start of step 4, after the checkpoint of
    step 4 (2 bad in a row): the resumed run must stop at step 4's bad step, as an uninterrupted one does."""
    train = _train(8, max_bad_steps=3)
    with pytest.raises(NonFiniteLoss, match="student step 5: "):
        _fit(_mlp(), PoisonLoss(_task(), {2, 3, 4}), train, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _fit(_mlp(), PoisonLoss(_task(), {2, 3, 4}, kill_at=4), train, tmp_path / "killed")
    assert read_checkpoint(tmp_path / "killed" / "student" / CHECKPOINT)["bad_steps"]["in_a_row"] == 2
    with pytest.raises(NonFiniteLoss, match="student step 5: loss is nan .*3 bad steps in a row"):
        _fit(_mlp(), PoisonLoss(_task(), {2, 3, 4}), train, tmp_path / "killed")
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "straight")


def test_fp16_a_nan_loss_is_a_bad_step_an_overflow_is_the_scalers(tmp_path):
    """fp16 (the scaler runs on CPU here): an inf gradient with a finite loss is the scaler's skip (its scale
    halves, skipped_steps counts it); a NaN loss is a bad step (the scale stays, skipped_steps does not move).
    Neither changes the weights: both runs equal the same run stopped before the bad last step."""
    two = _mlp()
    _fit(two, _task(), _train(2, precision="fp16", min_lr=1e-2, warmup_steps=0), tmp_path / "two")
    for poison in (PoisonGrad, PoisonLoss):
        model, out = _mlp(), tmp_path / poison.__name__
        _fit(model, poison(_task(), {2}), _train(3, precision="fp16", min_lr=1e-2, warmup_steps=0), out)
        for name, value in two.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), (poison.__name__, name)
        rows = _rows(out)
        assert rows[-1]["step"] == 3
        if poison is PoisonGrad:
            assert rows[-1]["skipped_steps"] == 1 and rows[-1]["loss_scale"] == rows[1]["loss_scale"] / 2
            assert "bad_step" not in rows[-1]
        else:
            assert rows[-1]["bad_step"] == "loss" and rows[-1]["bad_steps"] == 1
            state = read_checkpoint(out / "student" / CHECKPOINT)
            assert state["precision"]["skipped"] == 0
            assert state["precision"]["scaler"]["scale"] == rows[1]["loss_scale"]  # not halved


def test_skip_leaves_the_fp16_scaler_ready_for_the_next_step():
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    amp = Precision("fp16", CPU)
    for _ in range(2):  # a skipped step after unscale_, then a normal one: no "unscale_ already called"
        amp.backward(model(torch.randn(4, WIDTH)).sum())
        amp.clip(list(model.parameters()), optimizer, 1.0)
        amp.skip(optimizer)
    assert amp.scaler.get_scale() == 2.0**16
