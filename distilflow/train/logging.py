"""Metrics as JSONL and TensorBoard event files, and a one-line progress display."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from distilflow.storage import append_text, disk_errors, write_text


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, stage: str, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.stage = stage
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / stage))

    def drop_after(self, step: int) -> None:
        """On resume: forget this stage's lines past ``step`` (they were written after the checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("stage") != self.stage or row.get("step", 0) <= step:
                keep.append(line)
        write_text(self.path, "".join(k + "\n" for k in keep))  # atomic: a kill here loses no row

    def write(self, row: dict[str, Any]) -> None:
        row = {"stage": self.stage, **row}
        append_text(self.path, json.dumps(row) + "\n", fsync=False)  # sync() with each checkpoint
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{self.stage}/{key}", value, row["step"])

    def sync(self) -> None:
        """Make the rows written so far durable (before a checkpoint that follows them is written)."""
        if self.path.is_file():
            with disk_errors(self.path):
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _throughput(info: dict[str, Any]) -> str:
    for unit in ("tokens", "samples"):
        if f"{unit}_per_s" in info:
            return f"{info[f'{unit}_per_s']:.0f} {unit}/s"
    return ""


def _clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``: a duration as a person reads it."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress of a stage: a tqdm bar on a terminal, plain lines (every 10 s) in a log.

    Both show phase, loss parts, KD weight, LR and throughput; the plain line adds elapsed time
    and the ETA, which the bar shows itself. ``start`` is the step a resumed stage continues from,
    so the rate (and the ETA) count only the steps run in this process.
    """

    def __init__(self, stage: str, total: int, start: int = 0, stream=None) -> None:
        self.stage, self.total, self.start = stage, total, start
        self.stream = stream or sys.stderr
        self.began = self.last_print = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=start, desc=stage, file=self.stream, dynamic_ncols=True, leave=True, unit="step"
            )

    def update(self, step: int, info: dict[str, Any], force: bool = False) -> None:
        parts = " ".join(f"{k} {v:.4f}" for k, v in info.get("parts", {}).items())
        status = (
            f"{info.get('phase', '')} loss {info['loss']:.4f} ({parts}) "
            f"kd_w {info.get('kd_weight', 0):.3f} lr {info['lr']:.2e} {_throughput(info)}"
        )
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(status, refresh=True)
            if step >= self.total:
                self.bar.close()
            return
        if not force and now - self.last_print < 10:
            return
        self.last_print = now
        elapsed = now - self.began
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        self.stream.write(f"[{self.stage}] {step}/{self.total} {status} elapsed {_clock(elapsed)} eta {_clock(eta)}\n")
        self.stream.flush()


class CountProgress:
    """Progress over a count of items (prompts, shards): a tqdm bar on a terminal, else a plain line
    every 10 s and one at the end (no carriage-return frames in a log file); nothing when not ``show``."""

    def __init__(self, desc: str, total: int, unit: str, *, show: bool = True, stream=None) -> None:
        self.desc, self.total, self.unit, self.show = desc, total, unit, show
        self.stream = stream or sys.stderr
        self.began = self.last_print = time.monotonic()
        self.done, self.status, self.printed = 0, "", 0
        self.bar = None
        if show and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit.rstrip("s"), file=self.stream, dynamic_ncols=True)

    def update(self, done: int, **status: Any) -> None:
        self.done, self.status = done, " ".join(f"{k} {v}" for k, v in status.items())
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(status)
        elif self.show and time.monotonic() - self.last_print >= 10:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.show and self.done != self.printed:  # the last count, unless just printed
            self._line()

    def _line(self) -> None:
        self.last_print = now = time.monotonic()
        self.printed = self.done
        elapsed = now - self.began
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        self.stream.write(
            f"[{self.desc}] {self.done}/{self.total} {self.unit} {self.status} elapsed {_clock(elapsed)} "
            f"eta {_clock(eta)}\n"
        )
        self.stream.flush()
