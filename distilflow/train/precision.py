"""Numerics and memory options of the training loop: mixed precision, gradient checkpointing, peak memory.

``train.precision``: the forward passes run under ``torch.autocast`` (bf16 or fp16) while the
weights, the optimizer state and the loss math stay float32 (the losses upcast their inputs).
fp16 has 5 exponent bits, so small gradients underflow: its backward pass goes through a
``torch.amp.GradScaler``, which multiplies the loss by a scale, unscales the gradients before
clipping, and skips (and halves the scale for) any step whose gradients overflowed. A skipped
step is normal fp16 behaviour, not a NaN stop; only a long run of them is (see MAX_SKIPPED).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from distilflow.config import TrainConfig
from distilflow.errors import UserError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Consecutive skipped fp16 steps after which the gradients count as non-finite at any scale: the
# scaler halves its scale on every skip, so 30 skips mean 2**30 times smaller than the last good one.
MAX_SKIPPED = 30


class Precision:
    """Autocast and (fp16) gradient scaling for one stage on one device.

    Per optimizer step: ``with autocast(): loss = ...``; ``backward(loss)``; ``clip(params, max_norm)``
    (unscales first, so the norm and the clipping see the true gradients); ``step(optimizer)``,
    which returns False when fp16's scaler skipped the step.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in AUTOCAST_DTYPES:
            raise UserError(f"train.precision {precision!r} is not allowed; use fp32, bf16 or fp16")
        self.precision, self.device_type = precision, device.type
        self.dtype = AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.skipped_in_a_row = 0
        self.skipped = 0

    @property
    def scaling(self) -> bool:
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward() if self.scaling else loss.backward()

    def clip(self, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, max_norm: float) -> float:
        """The global gradient norm before clipping (inf/NaN when fp16 gradients overflowed)."""
        if self.scaling:
            self.scaler.unscale_(optimizer)
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Apply the step; False when the scaler skipped it because the gradients were not finite."""
        if not self.scaling:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before  # the scale only shrinks on a skip
        self.skipped_in_a_row = 0 if stepped else self.skipped_in_a_row + 1
        self.skipped += 0 if stepped else 1
        return stepped

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """Leave this step out (a bad step, train/bad_steps.py): no optimizer step; fp16's scaler keeps its
        scale (a loss that is not finite is not an overflow of the gradients) and forgets this step's unscale."""
        if self.scaling:
            self.scaler.update(self.scaler.get_scale())

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaling:
            self.scaler.load_state_dict(state["scaler"])
        self.skipped, self.skipped_in_a_row = int(state["skipped"]), int(state["skipped_in_a_row"])


# ---------------------------------------------------------------- checks before anything is written


def check_train_options(train: TrainConfig, model: nn.Module, device: torch.device, key: str) -> None:
    """Refuse what cannot run: fp16 on a CPU, gradient checkpointing on a model without it.

    ``key`` is the config section of ``train`` (``student.train``), named in the error.
    """
    if train.precision == "fp16" and device.type != "cuda":
        raise UserError(
            f"config key '{key}.precision': 'fp16' is not allowed on device {device.type}; fp16 training needs a "
            "GPU (use bf16 on CPU, or fp32)"
        )
    if train.gradient_checkpointing:
        _need_gradient_checkpointing(model, key)


def check_teacher_dtype(dtype: str, device: torch.device, key: str = "teacher.model.dtype") -> None:
    if dtype == "float16" and device.type != "cuda":
        raise UserError(
            f"config key '{key}': 'float16' is not allowed on device {device.type}; use bfloat16 or "
            "float32 on CPU (float16 needs a GPU)"
        )


# ---------------------------------------------------------------- gradient checkpointing


def supports_gradient_checkpointing(model: nn.Module) -> bool:
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and hasattr(
        model, "gradient_checkpointing_enable"
    )


def _need_gradient_checkpointing(model: nn.Module, key: str) -> None:
    if not supports_gradient_checkpointing(model):
        raise UserError(
            f"config key '{key}.gradient_checkpointing': true is not allowed for {type(model).__name__}; it needs a "
            "Hugging Face model that supports it (arch 'hf'), so set it to false"
        )


def set_gradient_checkpointing(model: nn.Module, enabled: bool, key: str = "train") -> None:
    """transformers' gradient (activation) checkpointing of the decoder layers, non-reentrant (works with
    frozen inputs, keyword arguments and forward hooks); it acts in training mode only, so evaluation is
    unchanged. transformers >= 5.x names it activation_checkpointing; older versions gradient_checkpointing."""
    if enabled:
        _need_gradient_checkpointing(model, key)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif is_gradient_checkpointing(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


def is_gradient_checkpointing(model: nn.Module) -> bool:
    if not supports_gradient_checkpointing(model):
        return False
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


# ---------------------------------------------------------------- teacher dtype


def cast_teacher(model: nn.Module, dtype: str) -> nn.Module:
    """The frozen teacher in ``dtype`` for the distillation forward passes (in place).

    Floating inputs (a classifier's ``x``) are cast to it by a forward pre-hook; integer inputs
    (token ids, masks) pass unchanged. A teacher already in ``dtype`` (a folder loaded in it) is
    returned as is. The losses upcast the teacher's logits and features to float32.
    """
    target = TEACHER_DTYPES[dtype]
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == target for p in floating):
        return model
    model.to(target)

    def cast_inputs(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def cast(value: Any) -> Any:
            return value.to(target) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}

    model.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    return model


# ---------------------------------------------------------------- peak memory


def _read_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns its scope.

    ``"stage"``: Linux let us reset the process's resident high-water mark (``/proc/self/clear_refs``
    5), so the next reading is the peak since now. ``"process"``: it could not be reset (not Linux,
    or not allowed), so the reading is the peak since the process started.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "stage"
    except OSError:
        return "process"


def peak_memory(device: torch.device) -> dict[str, int]:
    """``peak_rss_bytes``: resident high-water mark (VmHWM, else getrusage ru_maxrss); and on a GPU
    ``peak_cuda_bytes``: the most memory torch's allocator held for tensors."""
    peak = _read_status("VmHWM")
    if peak is None:
        import resource
        import sys

        # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    out = {"peak_rss_bytes": int(peak)}
    if device.type == "cuda":
        out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out
