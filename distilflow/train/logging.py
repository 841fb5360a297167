"""Metrics as JSONL and TensorBoard event files, and a one-line progress display."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


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
        self.path.write_text("".join(k + "\n" for k in keep))

    def write(self, row: dict[str, Any]) -> None:
        row = {"stage": self.stage, **row}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{self.stage}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _throughput(info: dict[str, Any]) -> str:
    for unit in ("tokens", "samples"):
        if f"{unit}_per_s" in info:
            return f"{info[f'{unit}_per_s']:.0f} {unit}/s"
    return ""


class Progress:
    """Phase, loss parts, KD weight, LR and samples/s on one line (redrawn on a terminal)."""

    def __init__(self, stage: str, total: int, stream=None) -> None:
        self.stage, self.total = stage, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_print = 0.0

    def update(self, step: int, info: dict[str, Any], force: bool = False) -> None:
        now = time.monotonic()
        if not force and not self.tty and now - self.last_print < 10:
            return
        self.last_print = now
        parts = " ".join(f"{k} {v:.4f}" for k, v in info.get("parts", {}).items())
        line = (
            f"[{self.stage}] {step}/{self.total} {info.get('phase', '')} loss {info['loss']:.4f} ({parts}) "
            f"kd_w {info.get('kd_weight', 0):.3f} lr {info['lr']:.2e} {_throughput(info)}"
        )
        if self.tty:
            self.stream.write("\r" + line[:200].ljust(120))
            if force:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
