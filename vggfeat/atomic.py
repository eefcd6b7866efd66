"""Files written whole or not at all, and the locks that keep two writers apart.

Shared by the store (parts, run records, the output) and ``export`` (its
files). A file is written under a temporary name that no other writer uses,
flushed, fsync'ed and renamed into place, so a reader sees it whole or not at
all, and a writer cleaning up after a killed one can tell whose leftovers are
whose. Locks are the kernel's (``flock``): a lock left by a dead process
blocks nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vggfeat.errors import OutputError

#: Free space always left on the output's disk, for HDF5's own bookkeeping and the system.
RESERVE_BYTES = 16 << 20


def temporary_name(target: Path) -> Path:
    """A name beside ``target`` that no other writer uses: ``<name>.<pid>-<random>.tmp``."""
    return target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


#: What ``temporary_name`` adds to a name, as a regular expression.
TEMPORARY_SUFFIX = r"\.\d+-[0-9a-f]{8}\.tmp"


def write_atomically(
    target: Path, write: Callable[[IO[bytes]], Any], output: Path, kept: str
) -> None:
    """Write ``target`` through ``write(file)``: whole, or not at all.

    A failed write raises ``OutputError`` naming ``output`` (the file the user
    asked for) and saying what is ``kept``; the temporary file is removed.
    """
    temporary = temporary_name(target)
    try:
        with temporary.open("xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
        fsync_folder(target.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise write_error(error, target, output, kept) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    with path.open("rb") as file:
        os.fsync(file.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_error(error: Exception, target: Path, output: Path, kept: str) -> OutputError:
    """A failed write as one line: a full disk and a file-size limit named as such."""
    code = getattr(error, "errno", None)
    if code is None:  # HDF5 puts the system's errno in its message
        found = re.search(r"errno = (\d+)", str(error))
        code = int(found[1]) if found else None
    if code == errno.ENOSPC:
        free = shutil.disk_usage(target.parent).free
        return OutputError(
            f"no space left on the disk holding {output} ({size_text(free)} free); {kept}: "
            "free some space and run the same command to continue"
        )
    if code == errno.EFBIG:
        return OutputError(
            f"file size limit reached writing {target} (see 'ulimit -f'); {kept}: "
            "raise the limit and run the same command to continue"
        )
    refused = refusal(target.parent, code)
    if refused is not None:
        return OutputError(
            f"cannot write {target}: {refused}; {kept}: run the same command again once it "
            "can be written"
        )
    reason = getattr(error, "strerror", None) or first_line(error)
    return OutputError(f"cannot write {target}: {reason}; {kept}")


def why_unwritable(folder: Path) -> str | None:
    """Why this process cannot make files in ``folder``, in words (``refusal``'s); None
    where it can."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return refusal(folder, errno.EROFS if read_only(folder) else errno.EACCES)


def refusal(folder: Path, code: int | None) -> str | None:
    """A write in ``folder`` refused with error ``code``, in words: ``<folder> is on a
    read-only file system`` or ``no permission to write in <folder>``; None for any other
    error. A read-only mount refuses even root, whom permission bits do not stop."""
    if code not in (errno.EROFS, errno.EACCES, errno.EPERM):
        return None
    where = os.path.abspath(folder)  # "." says nothing in a message
    if code == errno.EROFS or read_only(folder):
        return f"{where} is on a read-only file system"
    return f"no permission to write in {where}"


def read_only(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def require_space(folder: Path, need: int, purpose: str, output: Path, kept: str) -> None:
    """Refuse, before writing anything, when ``folder``'s disk has less than ``need`` bytes."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise OutputError(
            f"not enough free space to {purpose}: {size_text(free)} free on the disk holding "
            f"{output}, about {size_text(need)} needed; {kept}: free some space and run "
            "the same command to continue"
        )


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def size_text(count: float) -> str:
    """``512 bytes``, ``1.5 MB``, ``2.0 GB``."""
    for unit in ("bytes", "KB", "MB"):
        if count < 1000:
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    return f"{count:,.1f} GB"


# Locks ---------------------------------------------------------------------------------------


def try_lock(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int | None:
    """A descriptor of ``path`` holding an exclusive ``flock``; None if another holds it."""
    descriptor = os.open(path, flags, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


class Lock:
    """An exclusive lock held for as long as this process keeps it, with its PID inside."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def take(cls, path: Path) -> Lock | None:
        """The lock of ``path``, or None at once if another process holds it."""
        descriptor = try_lock(path)
        if descriptor is None:
            return None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        return cls(path, descriptor)

    @staticmethod
    def holder(path: Path) -> str:
        """The PID written in a lock file, as text ("unknown" if none)."""
        try:
            return path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
