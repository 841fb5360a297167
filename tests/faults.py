"""A full disk on demand: the fsync of a chosen file fails with ENOSPC, as a full disk makes it fail.

Every writer of distilflow (atomic writes of checkpoints, weights, shards, ONNX files, PNGs, JSON;
appends of metrics and generated rows) fsyncs what it wrote before it counts as written, so failing
the fsync of one file reaches every writer at the moment its data would meet the disk. The folder is
snapshotted at that moment: a test then checks that the failure changed nothing already there.
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
    """``os.fsync`` of the ``nth`` file whose name (of its atomic-write target) matches ``pattern``
    raises ENOSPC; ``folder`` is snapshotted just before, ``failed`` is the target path."""

    def __init__(self, monkeypatch, folder: Path, pattern: str, nth: int = 1) -> None:
        self.folder, self.pattern, self.left = Path(folder), pattern, nth
        self.failed: Path | None = None
        self.before: dict[str, str] = {}
        self.real = os.fsync
        monkeypatch.setattr(os, "fsync", self.fsync)

    def fsync(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        match = _TEMP.match(path.name)
        target = path.with_name(match.group("target")) if match else path
        if self.failed is None and fnmatch.fnmatch(target.name, self.pattern):
            self.left -= 1
            if self.left == 0:
                self.failed = target
                self.before = snapshot(self.folder) if self.folder.is_dir() else {}
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.real(fd)


# A top-k teacher cache of the tiny run (tests/conftest.py) in 7 shards of its 220 rows (train + transfer).
SHARDED_CACHE = ["cache.use=true", "cache.features=true", "cache.format=topk", "cache.k=4", "cache.shard_rows=32"]
