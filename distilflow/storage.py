"""Writing files so that a kill, a full disk or a read-only folder never costs what was written before.

- :func:`atomic_write`: the new content goes to a temporary file in the same folder, is flushed and
  fsynced, renamed over the old file, and the folder itself is fsynced (so the rename survives a power
  cut). A crash at any moment leaves the old file or the new one, never half of one; a write that
  fails removes its temporary file and leaves the old file as it was.
- :class:`WriteFailed`: a write that failed for a reason of the disk (full, quota, read-only, I/O
  error, permissions) as one line naming the path and the free space there. :func:`disk_errors`
  turns such a failure raised by any writer inside it (ours, torch, safetensors, ONNX, matplotlib)
  into one.
- :func:`append_text`: an append that fails leaves the file as it was before it.
- :func:`check_writable`: an output folder that cannot be written is refused before any work.
- :func:`remove_stale_temps`: temporary files left by a killed write are removed when a writer starts
  again in that folder.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from distilflow.errors import UserError

# Failures that say the file system refused the write, not that the program is wrong.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# safetensors' Rust writer and torch's C++ writer say "(os error 28)" / "[Errno 28]" in their messages.
_ERRNO_IN_TEXT = re.compile(r"(?:os error|Errno) (\d+)")
# Temporary files of atomic_write: ".<target name>.<8 random characters>.tmp" (tempfile.mkstemp).
_TEMP = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


class WriteFailed(UserError):
    """A write refused by the file system; what was written before it is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; results and weights get the permissions
# of any other file the user writes (0o666 less the umask).
FILE_MODE = 0o666 & ~_umask()


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def free_space(path: str | Path) -> str:
    """Free space on the file system of ``path`` (or of its nearest existing parent), for a message."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{human_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        return "free space unknown"


def errno_in_text(text: str) -> int | None:
    """The errno of a failure of the disk named in a message ("[Errno 28]", "(os error 28)"), else None."""
    for match in _ERRNO_IN_TEXT.finditer(text):
        if int(match.group(1)) in DISK_ERRNOS:
            return int(match.group(1))
    return None


def disk_errno(exc: BaseException) -> int | None:
    """The errno of a failure of the disk in ``exc`` (or the exceptions it came from), else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno
        if not isinstance(exc, OSError) and errno_in_text(str(exc)) is not None:
            return errno_in_text(str(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_failure(path: str | Path, code: int) -> WriteFailed:
    return WriteFailed(
        f"writing '{path}' failed: {DISK_ERRNOS[code]} ({errno.errorcode.get(code, code)}), {free_space(path)}; "
        "the files written before are intact: make room (or choose another output_dir) and run the same command "
        "again to continue"
    )


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """A failure of the disk inside the block becomes one :class:`WriteFailed` line naming ``path``
    (or the file the error names); any other exception passes unchanged."""
    try:
        yield
    except WriteFailed:
        raise
    except Exception as exc:
        code = disk_errno(exc)
        if code is None:
            raise
        named = exc.filename if isinstance(exc, OSError) and exc.filename else path
        raise write_failure(named, code) from None


def writes_into(folder_argument: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: a failure of the disk inside the function is one :class:`WriteFailed` line naming the
    file (when the error names it) or the folder given as ``folder_argument``."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with disk_errors(signature.bind(*args, **kwargs).arguments[folder_argument]):
                return function(*args, **kwargs)

        return wrapped

    return decorate


class _Sink:
    """A file object for ``torch.save``: its C++ writer reports a failed Python write as a bare
    RuntimeError ("unexpected pos"); the sink keeps the OSError so that the caller can raise it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, with a failed write raised as its OSError (errno kept)."""
    import torch

    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def fsync_folder(folder: str | Path) -> None:
    """Make a rename (or a new file) in ``folder`` durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows) do not fsync folders
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the content to the path it is given; then fsync, rename over ``path``,
    fsync the folder. A failure of the disk is one :class:`WriteFailed` line; ``path`` is untouched."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, FILE_MODE)  # after writing: some writers (safetensors) replace the file
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_folder(path.parent)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def append_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """Append ``text`` to ``path`` (then fsync, unless told not to). A failed append is cut back to the
    old end of the file (which needs no space), so no half-written line stays, and becomes one
    :class:`WriteFailed` line."""
    path = Path(path)
    data = memoryview(text.encode("utf-8"))
    with disk_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:  # write(2) may write part of the bytes when the disk fills up
                    data = data[os.write(fd, data) :]
                if fsync:
                    os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


def remove_stale_temps(folder: str | Path, targets: tuple[str, ...] | None = None) -> list[Path]:
    """Remove the temporary files that a killed :func:`atomic_write` left in ``folder`` (only those of
    the file names in ``targets`` when given); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMP.match(path.name)
        if match and (targets is None or match.group("target") in targets) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_writable(folder: str | Path, what: str) -> None:
    """Refuse an output folder that cannot be written, before any work: a file is created and removed
    in it (or in its nearest existing parent, which must let the folder be created). Permission bits
    alone do not tell (root ignores them); a read-only mount, a full quota or an ACL do."""
    target = Path(folder)
    probe_in = target
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        return  # a file in the way: the caller's own check names it
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=".distilflow-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        reason = f"{DISK_ERRNOS.get(exc.errno, exc.strerror or type(exc).__name__)}, {free_space(probe_in)}"
        where = f"'{target}' is" if probe_in == target else f"'{target}' cannot be created: '{probe_in}' is"
        raise UserError(f"{what} {where} not writable ({reason}); choose a folder you can write to") from None
