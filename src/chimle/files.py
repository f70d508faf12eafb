"""Writes that survive a crash, and the error for a file chimle cannot write or read.

Every file chimle writes whole (model files, training states, configs, samples, grids, reports) goes through
`atomic_write`: a temporary file in the same folder, fsync, rename. A process killed at any moment, or a full disk,
leaves the previous file whole. Logs are appended line by line instead.
"""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

CRASH_VARIABLE = "CHIMLE_CRASH_AT"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, foreign or does not fit what it is used for."""


def atomic_write(path: str | Path, content: bytes | memoryview | Callable[[Path], None]) -> None:
    """Write `content` (bytes, or a function writing a given temporary path), fsync, then rename over `path`:
    readers see the old or the new file, never a partial one, even if the process is killed. A failed write (a
    full disk) raises CheckpointError and leaves the old file as it was."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp)
    try:
        if callable(content):
            os.close(fd)
            fd = -1
            content(tmp)
            fd = os.open(tmp, os.O_RDWR)
        else:
            _write_all(fd, content)
        crash_point(f"write:{path.name}")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as error:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
            raise CheckpointError(_write_failure(path, error, kept)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_folder(path: str | Path, what: str = "--out") -> Path:
    """Refuse, before any work, a folder to write into that is a file, lies under a file, or cannot be made or
    written to; nothing is created here."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if existing != path and not existing.is_dir():
        raise CheckpointError(f"{what} {path} lies under {existing}, which is a file; give a folder path")
    if not existing.is_dir():
        raise CheckpointError(f"{what} {path} is a file; give a folder (it is created if needed)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what} {path}: cannot write in {existing} (permission denied); give a folder you "
                              "can write to")
    return path


def _write_all(fd: int, content: bytes | memoryview) -> None:
    with memoryview(content) as view:
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])


def _write_failure(path: Path, error: OSError, note: str = "") -> str:
    """What to tell the user when writing `path` failed."""
    note = f" ({note})" if note else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"could not write {path}: {error.strerror or error}{note}; free some space on that disk, or move "
                "the run to a larger one, then continue with --resume")
    return f"could not write {path}: {error.strerror or error}{note}"


@contextmanager
def disk_errors(path: str | Path):
    """Turn a failed write to `path` (a full disk, a read-only folder) into a CheckpointError saying what to do."""
    try:
        yield
    except OSError as error:
        raise CheckpointError(_write_failure(Path(path), error)) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: with CHIMLE_CRASH_AT=NAME or NAME:N in the environment, the
    N-th arrival (default 1st) at point NAME SIGKILLs this process, as a power cut or the OOM killer would.
    Points: `search` (a round's codes searched, not yet recorded), `step` (weights updated, not yet saved),
    `write:FILE` (a file's new contents written, not yet renamed into place)."""
    spec = os.environ.get(CRASH_VARIABLE)
    if not spec:
        return
    point, _, count = spec.rpartition(":")
    if not count.isdigit():
        point, count = spec, "1"
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(count):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
