"""A full disk on demand: the write of a chosen file fails with ENOSPC, as a full disk makes it fail.

Every atomic write of distilflow (checkpoints, weights, shards, ONNX files, PNGs, JSON) fsyncs its
temporary file before the rename, whatever library wrote it, so failing that fsync reaches every
writer where a full disk fails it at the latest; appends (metrics, generated rows) fail at their
``os.write``. The folder is snapshotted just before: a test then checks that the failure changed
nothing already there.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
from pathlib import Path

# The temporary file of an atomic write of NAME: ".NAME.<8 characters>.tmp".
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), temporary files of atomic writes left out."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not _TEMP.match(path.name):
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class FullDisk:
    """The ``nth`` write of a file whose name matches ``pattern`` fails with ENOSPC: for an atomic write
    (a temporary file named after its target) at its fsync, for an append at its ``os.write``.
    ``folder`` is snapshotted just before; ``failed`` is the target's path."""

    def __init__(self, monkeypatch, folder: Path, pattern: str, nth: int = 1) -> None:
        self.folder, self.pattern, self.left = Path(folder), pattern, nth
        self.failed: Path | None = None
        self.before: dict[str, str] = {}
        self.real, self.real_write = os.fsync, os.write
        monkeypatch.setattr(os, "fsync", self.fsync)
        monkeypatch.setattr(os, "write", self.write)

    def _due(self, fd: int, *, atomic: bool) -> bool:
        if self.failed is not None:
            return False
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        match = _TEMP.match(path.name)
        if bool(match) != atomic:
            return False
        target = path.with_name(match.group("target")) if match else path
        if not fnmatch.fnmatch(target.name, self.pattern):
            return False
        self.left -= 1
        if self.left:
            return False
        self.failed = target
        self.before = snapshot(self.folder) if self.folder.is_dir() else {}
        return True

    def heal(self, monkeypatch) -> None:
        """Room again: writes succeed."""
        monkeypatch.setattr(os, "fsync", self.real)
        monkeypatch.setattr(os, "write", self.real_write)

    def fsync(self, fd: int) -> None:
        if self._due(fd, atomic=True):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)

    def write(self, fd: int, data) -> int:
        if fd > 2 and self._due(fd, atomic=False):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real_write(fd, data)


# A top-k teacher cache of the tiny run (tests/conftest.py) in 7 shards of its 220 rows (train + transfer).
SHARDED_CACHE = ["cache.use=true", "cache.features=true", "cache.format=topk", "cache.k=4", "cache.shard_rows=32"]
# The deploy stage at its cheapest: the ONNX export, dynamic int8, one timed call at batch 1.
QUICK_DEPLOY = [
    "deploy.enabled=true",
    "deploy.methods=[dynamic]",
    "deploy.iterations=1",
    "deploy.batch_sizes=[1]",
    "deploy.torch_backend='off'",
]
