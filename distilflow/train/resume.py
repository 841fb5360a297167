"""Which checkpoint a stage resumes from, and the older ones kept beside it (``train.keep_last``).

A stage folder holds its latest checkpoint as ``checkpoint.pt`` and up to ``keep_last - 1`` older
ones as ``checkpoint-<step>.pt``. Saving a new checkpoint renames the latest to its step's name
(an atomic rename), removes the oldest beyond ``keep_last``, then writes the new latest atomically,
so at most ``keep_last`` checkpoints are on disk at any moment (two with ``keep_last: 1``, while
the new one is written).

Resuming reads the newest checkpoint and checks its digest; a damaged one (truncated, altered, not
a checkpoint) is renamed ``<name>.damaged`` with a one-line notice and the next older one is used.
Resuming from an older checkpoint is exact too (schedules and RNG state are restored), it only
repeats the steps after it. Under torchrun every rank reads the same files and takes the same one.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from distilflow.errors import UserError
from distilflow.storage import disk_errors, fsync_folder, remove_stale_temps
from distilflow.train.checkpoint import CHECKPOINT, DamagedCheckpoint, read_checkpoint, write_checkpoint

_OLDER = re.compile(r"^checkpoint-(\d+)\.pt$")
DAMAGED_SUFFIX = ".damaged"


def older_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


class StageCheckpoints:
    """The checkpoints of one stage folder. ``main``: this process writes (rank 0 under torchrun)."""

    def __init__(self, folder: Path, *, keep_last: int = 2, main: bool = True) -> None:
        self.folder, self.keep_last, self.main = Path(folder), max(int(keep_last), 1), main
        self.latest = self.folder / CHECKPOINT
        self.latest_step: int | None = None  # the step of checkpoint.pt, once it is known to be good
        self.good: Path | None = None  # the newest checkpoint known to be good (named when a run stops)

    def older(self) -> list[tuple[int, Path]]:
        """Older checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _OLDER.match(p.name)) and p.is_file()]
        return sorted(found, reverse=True)

    def load(self) -> dict[str, Any] | None:
        """The newest good checkpoint's state, or None when the stage has none; damaged ones are set aside."""
        if self.main:
            remove_stale_temps(self.folder)  # a write killed halfway: its temporary file
        candidates = [(None, self.latest)] if self.latest.is_file() else []
        candidates += self.older()
        if not candidates:
            return None
        damaged: list[tuple[Path, str]] = []
        for step, path in candidates:
            try:
                state = read_checkpoint(path)
            except DamagedCheckpoint as exc:
                damaged.append((path, str(exc)))
                continue
            except UserError:
                if path.exists():
                    raise
                continue  # under torchrun: rank 0 set this damaged one aside while this rank looked
            if step is not None and int(state["step"]) != step:  # a file renamed by hand
                damaged.append((path, f"checkpoint '{path}' holds step {state['step']}, not {step}"))
                continue
            self._set_aside(damaged, path, int(state["step"]))
            self.good = path
            self.latest_step = int(state["step"]) if path == self.latest else None
            return state
        first = damaged[0][1]
        more = f" (and {len(damaged) - 1} older checkpoints are damaged too)" if len(damaged) > 1 else ""
        raise UserError(
            f"{first}{more}; no good checkpoint is left in '{self.folder}': delete that folder to train the stage again"
        )

    def _set_aside(self, damaged: list[tuple[Path, str]], used: Path, step: int) -> None:
        if not damaged:
            return
        if self.main:
            for path, reason in damaged:
                print(f"distilflow: {reason}; resuming from '{used}' (step {step}) instead", file=sys.stderr)
                with disk_errors(path):
                    os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
        # Other ranks: the same files, the same choice; rank 0 renames (a rank that opens a file
        # rank 0 already renamed finds the next one, the same good one).

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Write ``state`` as the latest checkpoint, keeping ``keep_last`` in all (only ``main`` calls this)."""
        if self.keep_last > 1 and self.latest_step is not None and self.latest.is_file():
            moved = self.folder / older_name(self.latest_step)
            with disk_errors(self.latest):
                os.replace(self.latest, moved)  # atomic: the old latest is now the newest older one
            self.good, self.latest_step = moved, None
        if self.keep_last > 1:  # keep_last - 1 older ones stay beside the one being written
            for _, path in self.older()[self.keep_last - 1 :]:
                path.unlink(missing_ok=True)
        write_checkpoint(self.latest, state)
        if self.keep_last == 1:  # older ones of a run that kept more: removed once the new one is safe
            for _, path in self.older():
                path.unlink(missing_ok=True)
        fsync_folder(self.folder)
        self.latest_step, self.good = step, self.latest
