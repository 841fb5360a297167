"""Steps whose loss or gradient is not finite: skipped and counted; only a run of them stops the stage.

A NaN or inf in the loss or the gradient norm of one step (an extreme batch, a spike) costs that
step only: the optimizer does not step (weights, AdamW moments and its step count stay as they were),
the step is logged as a bad step in metrics.jsonl, and training goes on. ``train.max_bad_steps`` bad
steps in a row stop the stage with one line naming the likely causes; the last good checkpoint is
kept (bad steps change no weights, so every checkpoint written is good).

Under torchrun the verdict is global: a rank's loss is only its rows' share, so the ranks sum a
"not finite here" flag, and the gradient norm is already global after DDP's all-reduce (FSDP2 reduces
it in ``clip_grad_norm_``); every rank skips the same steps. With fp16 the gradient scaler skips
overflowing steps itself and lowers its scale (train/precision.py); a step is ours to skip only when
its loss is not finite (the scaler cannot fix a forward pass that overflowed).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from distilflow.errors import UserError


class NonFiniteLoss(UserError):
    """The loss or the gradient stayed NaN/inf; the run stops and keeps the last good checkpoint."""

    rank_0_reports = True  # the verdict is global: every rank stops at the same step with the same line


class BadSteps:
    """The count of bad steps of one stage (total and in a row), saved in its checkpoints."""

    def __init__(self, stage: str, limit: int, *, lr_key: str, announce: bool = True) -> None:
        self.stage, self.limit, self.lr_key, self.announce = stage, max(int(limit), 1), lr_key, announce
        self.total = 0
        self.in_a_row = 0

    def verdict(self, world: Any, loss: float, grad_norm: float, *, scaler_skips: bool) -> str | None:
        """What was not finite in this step ("loss", "gradient norm"), or None when the step is good or is
        the fp16 scaler's to skip (``scaler_skips``: finite loss, overflowing gradients). A collective
        under torchrun: every rank gets the same answer."""
        local = 0.0 if math.isfinite(loss) else 1.0
        if world.distributed:
            local = world.all_reduce_sums({"not_finite": local})["not_finite"]
        if local > 0:
            return "loss"
        if not math.isfinite(grad_norm) and not scaler_skips:
            return "gradient norm"
        return None

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int, what: str, value: float, parts: dict[str, float], checkpoint: Any) -> dict[str, Any]:
        """Count a bad step (0-based ``step``); its metrics row. Raises :class:`NonFiniteLoss` at the limit."""
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise self.stop(step, what, value, parts, checkpoint)
        if self.announce:
            print(
                f"distilflow: {self.stage} step {step + 1}: {what} is {value}; the step is skipped ({self.in_a_row} "
                f"in a row, {self.total} in this stage; {self.limit} in a row stop the run)",
                file=sys.stderr,
            )
        return {"bad_step": what, "bad_steps": self.total, "bad_in_a_row": self.in_a_row}

    def stop(self, step: int, what: str, value: float, parts: dict[str, float], checkpoint: Any) -> NonFiniteLoss:
        detail = ", ".join(f"{k}={v:.4g}" for k, v in parts.items()) or "no parts"
        kept = f"last good checkpoint kept at {checkpoint}" if checkpoint else "no checkpoint was written yet"
        run = f"{self.in_a_row} bad steps in a row" if self.limit > 1 else "a bad step (train.max_bad_steps 1)"
        return NonFiniteLoss(
            f"{self.stage} step {step + 1}: {what} is {value} ({detail}), {run}; stopped, {kept}. "
            f"Likely causes: {likely_causes(parts, self.lr_key)}"
        )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        state = state or {}  # absent in checkpoints written before bad steps were skipped
        self.total, self.in_a_row = int(state.get("total", 0)), int(state.get("in_a_row", 0))


def likely_causes(parts: dict[str, float], lr_key: str) -> str:
    """The causes of a non-finite loss, most likely first, from which loss parts are not finite."""
    bad = [k for k, v in parts.items() if not math.isfinite(v)]
    causes = []
    if bad and all(k in ("kd", "feature") for k in bad):
        causes.append(f"the teacher's outputs ({'+'.join(bad)} not finite): check the teacher weights or its cache")
    causes += [
        f"a learning rate too high for this model (lower {lr_key}, keep grad_clip on)",
        "NaN, inf or extreme values in the data",
        "a forward pass that overflows in bf16/fp16 (try precision fp32)",
    ]
    return "; ".join(causes)
