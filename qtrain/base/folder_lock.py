"""One writer per folder: an exclusive OS lock on a folder that a command writes into.

`FolderLock(folder)` creates the folder if needed and takes `flock(LOCK_EX | LOCK_NB)` on
FOLDER/.qtrain.lock, then writes its process id and command line into that file. A second
process (or a second lock in the same process) is refused at once with a `UserError` naming
the folder and the holder's pid and command. `FolderLock(folder, wait=True)` waits for the
holder instead (logging once whom it waits for): the turn-taking of processes that may each
have to write the same thing, such as a data set that several workers find missing at once.
A waiting lock on a folder that the same thread already holds is taken at once without
locking again (a run whose data folder is its own run folder would otherwise wait for
itself forever).

The lock belongs to the open file, so the OS drops it when the holder exits in any way,
SIGKILL and power loss included: a lock file left behind by a killed process never blocks (the
next holder locks it and writes its own pid). A child forked by the holder shares its open
files and holds the lock until it exits too. On release the holder deletes the lock file while
it still holds it, and removes the folders it created if they are still empty, so that a
command that fails leaves nothing behind; a process that opened the deleted file in the
meantime sees that the path no longer names the file it locked and tries again.

POSIX only: the lock is `fcntl.flock` (on NFS, Linux maps it to the server's byte-range
locks). Where `fcntl` does not exist (Windows) no lock is taken and two writers are not told
apart; the folder is still created.
"""

from __future__ import annotations

import logging
import os
import shlex
import stat
import sys
import threading
import time
import weakref
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.io import write_error

try:
    import fcntl
except ImportError:  # Windows: no locking (module docstring)
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".qtrain.lock"
# (thread, lock file) of every lock this process holds, so a waiting lock can tell its own
_HELD: set[tuple[int, str]] = set()
# The holder writes its pid just after locking; a contender that reads the file in between
# looks again for up to this long before it says "another process".
HOLDER_WAIT_S = 1.0


class FolderLock:
    """An exclusive lock on `folder` (module docstring), taken on construction.

    `out` is the library's name for the folder setting in the refusal ("choose another run
    folder"); the command line shows its flag (`--out`). With `wait`, a held lock is waited
    for rather than refused. Use it as a context manager, or call
    `release()`; releasing twice is harmless, and a lock dropped without it is released when
    it is garbage-collected or the interpreter exits.
    """

    def __init__(self, folder: str | Path, out: str = "output", wait: bool = False) -> None:
        self.folder = Path(folder)
        self._wait = wait
        self.path = self.folder / LOCK_FILE
        self._created = missing_folders(self.folder)
        fd, held = None, (threading.get_ident(), os.path.abspath(self.path))
        try:
            _make_folder(self.folder)
            if fcntl is not None and not (wait and held in _HELD):
                fd = self._lock(out)
                _HELD.add(held)
        except BaseException:
            _unlock(self.path, None, self._created, os.getpid(), held)
            raise
        self._finalizer = weakref.finalize(
            self, _unlock, self.path, fd, self._created, os.getpid(), held
        )

    def _lock(self, out: str) -> int:
        """The locked file's descriptor, with this process's pid and command line in it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # a releasing holder removed the folder it had made
                self._created = missing_folders(self.folder)
                _make_folder(self.folder)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if not self._wait:
                    os.close(fd)
                    raise UserError(
                        f"{_shown(self.folder)} is in use by {holder}; wait for it to finish or "
                        "choose another {out} folder",
                        out=out,
                    ) from None
                log.info("waiting for %s, which is writing into %s", holder, self.folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _names_file(self.path, fd):
                break
            os.close(fd)  # locked a file its holder deleted on release: lock the new one
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n{_command_line()}\n".encode())
        except OSError as error:  # a full disk: name the lock file, as every writer does
            os.close(fd)
            raise write_error(error, self.path) from None
        return fd

    def release(self) -> None:
        """Delete the lock file, unlock, and remove the folders this lock created if empty."""
        self._finalizer()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _unlock(path: Path, fd: int | None, created: list[Path], owner: int, held: tuple) -> None:
    """`FolderLock.release` of the lock file `path` open as `fd` (None: none was locked, or
    a waiting lock found the folder held by its own thread)."""
    if fd is not None:
        _HELD.discard(held)
        if os.getpid() == owner:  # a forked child that exits must not delete its parent's file
            path.unlink(missing_ok=True)  # while locked: nobody else holds this file
        os.close(fd)
    remove_empty_folders(created)


def remove_empty_folders(made: list[Path]) -> None:
    """Remove the folders of `made` (deepest first, as `missing_folders` lists them) up to the
    first that is not empty: a folder with output stays, and so do its parents."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            break


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _make_folder(folder: Path) -> None:
    """`folder.mkdir(parents=True, exist_ok=True)`, again when a releasing holder removed the
    folder between pathlib's mkdir and its check that a folder exists (FileExistsError)."""
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return
        except FileExistsError:
            try:
                mode = os.stat(folder).st_mode
            except FileNotFoundError:
                continue  # removed again: make it again
            if not stat.S_ISDIR(mode):
                raise  # a file is in the way


def _names_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not deleted or replaced)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _read_holder(fd: int) -> str:
    """'process PID (COMMAND)' from the lock file open as `fd`, or 'another process'."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        pid, _, command = os.pread(fd, 4096, 0).decode(errors="replace").partition("\n")
        if pid.strip().isdigit():
            command = command.strip()
            return f"process {pid.strip()}" + (f" ({command})" if command else "")
        if time.monotonic() >= deadline:
            return "another process"
        time.sleep(0.01)


def _command_line() -> str:
    """This process's command line, shortened: the program's name without its folder, a
    package run with `python -m` by the package's name, `python -c` as such."""
    argv = sys.argv or [""]
    program = Path(argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    name = "python -c" if argv[0] == "-c" else name or "python"
    line = " ".join([name, shlex.join(argv[1:])]).strip()
    return line if len(line) <= 200 else line[:197] + "..."


def _shown(folder: Path) -> Path:
    """`folder` as the user gave it; the current folder by its absolute path."""
    return folder if folder.parts else Path.cwd()
