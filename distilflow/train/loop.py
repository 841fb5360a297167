"""The one training loop: teacher training, the no-teacher baseline and distillation.

Read top-down: for each step -> phase and weights -> micro-batches -> forward student (and the
teacher, when the phase needs it) -> objective -> backward -> clip -> step -> log / eval /
checkpoint. What differs between the three uses is only the objective and whether a teacher
is given.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distilflow.config import TrainConfig
from distilflow.errors import UserError
from distilflow.losses.objective import Objective, Outputs, Targets, add_counts, uses_teacher
from distilflow.models.taps import Taps
from distilflow.schedules import lr_at
from distilflow.teachers.base import TeacherSignals
from distilflow.train import dist
from distilflow.train.bad_steps import BadSteps, NonFiniteLoss
from distilflow.train.diagnostics import StepWatch
from distilflow.train.kd_position import PositionWeights
from distilflow.train.logging import MetricsLog, Progress
from distilflow.train.precision import (
    MAX_SKIPPED,
    Precision,
    peak_memory,
    reset_peak_memory,
    set_gradient_checkpointing,
)
from distilflow.train.resume import StageCheckpoints
from distilflow.train.sync_batchnorm import unsync_batchnorm

__all__ = ["FitResult", "NonFiniteLoss", "Task", "fit"]

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """What the loop needs to know about a kind of model and data (classifier, causal LM)."""

    per_token: bool
    primary_metric: str

    unit: str  # what count() counts: "samples" or "tokens"

    def micro_batches(self, step: int) -> list[Batch]: ...

    def count(self, batch: Batch) -> int: ...

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...

    def targets(self, batch: Batch) -> Targets: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class FitResult:
    steps: int
    metrics: dict[str, float]
    seconds: float
    unit: str = "samples"
    units_per_s: float = 0.0  # throughput of the optimizer steps run in this call (not eval)
    # peak_rss_bytes (+ peak_cuda_bytes on a GPU) over this call, and peak_rss_scope: "stage" when the
    # OS let the high-water mark be reset at its start, else "process" (the peak since the process began).
    memory: dict[str, Any] = field(default_factory=dict)
    # dist.strategy fsdp2 under torchrun: unsharded copies of the trained model and heads (else None).
    model: nn.Module | None = None
    heads: nn.Module | None = None
    bad_steps: int = 0  # steps skipped because their loss or gradient was not finite (train/bad_steps.py)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    *,
    stage: str,
    model: nn.Module,
    objective: Objective,
    task: Task,
    train: TrainConfig,
    stage_dir: Path,
    log: MetricsLog,
    config: dict[str, Any],
    teacher: TeacherSignals | None = None,
    student_taps: Taps | None = None,
    watch: StepWatch | None = None,
    kd_position: PositionWeights | None = None,
) -> FitResult:
    """Train ``model`` (and the objective's projection heads) for ``train.steps`` steps.

    ``kd_position`` (``distill.adaptive``): on steps that use the KD term the teacher's signals of
    every micro-batch come first, then the input-adaptive KD weight of each position, normalised
    over the whole step (train/kd_position.py), and only then the forward and backward passes.

    Resumes from the newest good checkpoint of ``stage_dir`` (train/resume.py): model, heads,
    optimizer, gradient scaler, bad-step counts, step and RNG state are restored, and schedules are
    pure functions of the step, so the run continues exactly where it stopped. Forward passes
    (student and teacher) run under ``train.precision``'s autocast; see train/precision.py. A step
    whose loss or gradient is not finite is skipped (train/bad_steps.py). ``watch`` measures the
    diagnostics (train/diagnostics.py: agreement, per-pair feature similarity, loss spikes; default
    settings when None).
    """
    if objective.needs_teacher and teacher is None:
        raise UserError(f"stage '{stage}' uses teacher terms but no teacher was given")
    device = next(model.parameters()).device
    memory_scope = reset_peak_memory(device)
    amp = Precision(train.precision, device)
    set_gradient_checkpointing(
        model, train.gradient_checkpointing, "teacher.train" if stage == "teacher" else "student.train"
    )
    world = dist.current()  # a single process, or this rank of a torchrun job (train/dist.py)
    # The trained modules (the student ``model`` and the objective's heads) as this world trains them:
    # DDP / FSDP2 under torchrun, else as they are.
    replica = world.wrap(model, objective)
    params = replica.parameters()
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    watch = watch or StepWatch(heads=objective.heads, per_token=task.per_token)
    checkpoints = StageCheckpoints(stage_dir, keep_last=train.keep_last, main=world.is_main)
    lr_key = f"{'teacher' if stage == 'teacher' else 'student'}.train.lr"
    bad_steps = BadSteps(stage, train.max_bad_steps, lr_key=lr_key, announce=world.is_main)
    start = 0
    state = checkpoints.load()  # the newest good one; a damaged one is set aside with a notice
    if state is not None:
        try:
            replica.load_state(state, optimizer)
            if "precision" in state:  # absent in checkpoints written before train.precision existed
                amp.load_state_dict(state["precision"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"checkpoint '{checkpoints.good}' does not fit the configured {stage} ({type(exc).__name__}); "
                "use a fresh output_dir"
            ) from None
        bad_steps.load_state_dict(state.get("bad_steps"))
        _set_rng_state(state["rng"])
        watch.load_state_dict(state.get("diagnostics", {}))
        start = int(state["step"])
        log.drop_after(start)
    world.seed_ranks()  # under torchrun: one dropout stream per rank

    def save(step: int) -> None:
        state = replica.state(optimizer)  # model, heads, optimizer: full (gathered under FSDP2)
        if not world.is_main:
            return
        log.sync()  # the metrics rows up to this step reach the disk with the checkpoint
        checkpoints.save(
            step,
            {
                "stage": stage,
                "step": step,
                "phase": objective.phase(max(step - 1, 0)).name,
                **state,
                "precision": amp.state_dict(),
                "bad_steps": bad_steps.state_dict(),
                "rng": _rng_state(),
                "diagnostics": watch.state_dict(),
                "config": config,
            },
        )

    def teacher_signals(step: int, batch: Batch) -> Outputs:
        # A cache reader only moves stored tensors; autocast would try to "promote" its fp16 ones.
        with amp.autocast() if getattr(teacher, "autocast", False) else nullcontext():
            return teacher(batch, features="feature" in objective.phase(step).terms)

    def micro_loss(
        step: int, batch: Batch, target: Targets, rows: dict[str, int], teacher_out: Outputs | None
    ) -> tuple[torch.Tensor, dict]:
        """One micro-batch: teacher signals (when the phase needs them and they are not given yet),
        student forward, objective."""
        terms = objective.phase(step).terms
        wants_features = "feature" in terms
        if teacher_out is None and uses_teacher(terms):
            teacher_out = teacher_signals(step, batch)
        with amp.autocast():
            if wants_features and student_taps is not None:
                with student_taps.capture():
                    logits = task.forward(model, batch)
                student_out = Outputs(logits, student_taps.features())
            else:
                student_out = Outputs(task.forward(model, batch))
            loss, parts = objective(step, student_out, teacher_out, target, rows)
            watch.observe(student_out, teacher_out, target)  # logged steps only: agreement, feature similarity
        return loss, parts

    progress = Progress(stage, train.steps, start=start) if world.is_main else dist.NullProgress()
    metrics: dict[str, float] = {}
    began = time.monotonic()
    # Throughput counts the optimizer steps only (not evaluation or checkpoint writes).
    window_seconds, window_units = 0.0, 0
    step_seconds, step_units = 0.0, 0
    model.train()
    for step in range(start, train.steps):
        step_began = time.monotonic()
        lr = lr_at(step, lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps, total_steps=train.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        phase = objective.phase(step)
        done = step + 1
        # The first step of each phase is logged too: where its feature similarity and agreement start.
        logged = done % max(train.log_every, 1) == 0 or done == train.steps or step == phase.start
        watch.begin(logged)
        micro = [world.shard(b) for b in task.micro_batches(step)]  # this rank's rows of the global batch
        targets = [task.targets(b) for b in micro]
        rows: dict[str, int] = {}
        for target in targets:
            rows = add_counts(rows, target.counts(task.per_token))
        rows = world.all_reduce_counts(rows)  # the real rows of the whole global step
        given: list[Outputs | None] = [None] * len(micro)  # teacher signals computed before the step
        if kd_position is not None and "kd" in phase.terms:  # distill.adaptive: normalised over the step
            given = [teacher_signals(step, b) for b in micro]
            targets = kd_position.weigh(given, targets, per_token=task.per_token, world=world)

        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        parts_sum: dict[str, float] = {}
        for i, (batch, target) in enumerate(zip(micro, targets)):
            with replica.sync(last=i == len(micro) - 1):  # DDP: gradients are reduced on the last one
                loss, parts = replica(micro_loss, step, batch, target, rows, given[i])
                given[i] = None  # this micro-batch's teacher signals are no longer needed
                # DDP and FSDP2 average gradients over ranks; the sum of the shares is the global gradient.
                amp.backward(loss * world.size if world.distributed else loss)
            loss_sum += float(loss.detach())
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v.detach())
        grad_norm = amp.clip(params, optimizer, train.grad_clip)
        # A loss or gradient that is not finite: the step is skipped and counted (the same step on every rank).
        bad = bad_steps.verdict(world, loss_sum, grad_norm, scaler_skips=amp.scaling)
        # fp16: the scaler skips a step whose gradients overflowed and lowers its scale; only a long
        # run of skips means the gradients are not finite at any scale.
        if bad is None and not math.isfinite(grad_norm) and amp.skipped_in_a_row + 1 >= MAX_SKIPPED:
            what = f"gradient norm (after {MAX_SKIPPED} skipped fp16 steps)"
            raise bad_steps.stop(step, what, grad_norm, {}, checkpoints.good)
        if bad is None:
            amp.step(optimizer)
            bad_steps.good()
            # Every good step is judged for a loss spike (global values: the ranks' shares summed).
            judged = world.all_reduce_sums({"loss": loss_sum, **parts_sum})
            spike = watch.spike(phase.name, {k: judged[k] for k in parts_sum}, judged["loss"])
            if spike is not None:
                value, median = spike
                log.write(
                    {
                        "step": done,
                        "phase": phase.name,
                        "spike_loss": value,
                        "spike_median": median,
                        "grad_norm": grad_norm,
                    }
                )
        else:  # no optimizer step; counted, logged, and the run stops at max_bad_steps in a row
            amp.skip(optimizer)
            totals = world.all_reduce_sums({"loss": loss_sum, **parts_sum})  # global values, for the line
            value = totals.pop("loss") if bad == "loss" else grad_norm
            row = bad_steps.bad(step, bad, value, totals, checkpoints.good)
            log.write({"step": done, "phase": phase.name, **row})
        units, seconds = sum(task.count(b) for b in micro), time.monotonic() - step_began
        window_units, window_seconds = window_units + units, window_seconds + seconds
        step_units, step_seconds = step_units + units, step_seconds + seconds

        if logged and bad is None:
            # Logged values are global: the ranks' shares of loss and parts, and their units, summed.
            totals = world.all_reduce_sums({"loss": loss_sum, **parts_sum, "_units": window_units, **watch.sums()})
            window_units = int(totals.pop("_units"))
            diagnostics = watch.row(totals)
            info = {
                "step": done,
                "phase": phase.name,
                **totals,
                "kd_weight": objective.weights(step).get("kd", 0.0),
                "lr": lr,
                "grad_norm": grad_norm,  # before clipping
                f"{task.unit}_per_s": window_units / max(window_seconds, 1e-9),
                **diagnostics,
            }
            if kd_position is not None:
                info.update(kd_position.summary(world))  # kd_position_weight_min ... _max of the last weighted step
            if amp.scaling:
                info.update(loss_scale=amp.scaler.get_scale(), skipped_steps=amp.skipped)
            log.write(info)
            progress.update(done, {**info, "parts": {k: totals[k] for k in parts_sum}}, force=done == train.steps)
            window_seconds, window_units = 0.0, 0
        if (train.eval_every and done % train.eval_every == 0) or done == train.steps:
            metrics = replica.gathered(task.evaluate, model)
            log.write({"step": done, "phase": phase.name, **{f"eval_{k}": v for k, v in metrics.items()}})
            model.train()
        if (train.checkpoint_every and done % train.checkpoint_every == 0) or done == train.steps:
            save(done)
    if start >= train.steps:
        metrics = replica.gathered(task.evaluate, model)
    model.eval()
    unsync_batchnorm(model)  # torch's own BatchNorm again for what follows (evaluation, export)
    set_gradient_checkpointing(model, False)
    step_units = int(world.all_reduce_sums({"units": step_units})["units"])
    return FitResult(
        steps=train.steps,
        metrics=metrics,
        seconds=time.monotonic() - began,
        unit=task.unit,
        units_per_s=step_units / step_seconds if step_seconds else 0.0,
        memory={**peak_memory(device), "peak_rss_scope": memory_scope},
        bad_steps=bad_steps.total,
        **replica.finish(),
    )
