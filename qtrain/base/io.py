"""Atomic file writes: a reader sees the old file or the new one, never a torn mix.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target
(`os.replace` is atomic on POSIX and Windows); the folder is fsync'ed so that the rename itself
survives a power loss. A temporary file left by a killed write is removed by the next
successful write of the same target (one writer per file).

A write that fails (a full disk, an I/O error, a read-only file system) removes its temporary
and raises an OSError that names the target, not the temporary: a `WriteError` for the
machine's conditions (`MACHINE_ERRNOS`), else the OSError subclass of its errno.
"""

from __future__ import annotations

import errno
import glob
import os
import tempfile
from pathlib import Path

# The machine's condition, not the input's: a full disk, an exhausted quota, a failing disk, a
# read-only file system. Each maps to plain OSError, so `WriteError` loses no subclass.
MACHINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


class WriteError(OSError):
    """Writing `filename` failed for one of `MACHINE_ERRNOS`; what was there before is intact."""


def write_error(error: OSError, path: str | Path) -> OSError:
    """`error`, raised while writing `path`, as an OSError naming `path` (not a temporary's
    name, and never none): a `WriteError` for `MACHINE_ERRNOS`, else its errno's subclass."""
    if error.errno is None:
        return error
    kind = WriteError if error.errno in MACHINE_ERRNOS else OSError
    return kind(error.errno, error.strerror or os.strerror(error.errno), os.fspath(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # (a file where a folder should be stays a FileExistsError)
        if error.errno in MACHINE_ERRNOS:
            raise write_error(error, path.parent) from error
        raise
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from others
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(error, path) from error
        raise
    fsync_path(path.parent)
    # Writes killed before their rename (SIGKILL, power loss) leave temporaries behind.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """fsync a file or folder by its path: for a folder, that persists a rename into it
    (POSIX); a no-op where it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))
