"""Crash-torture harness: runs `qtrain train` in forked children and SIGKILLs them.

Starting Python and importing torch costs seconds per process, longer than a tiny training
run, so a kill-and-resume cycle per fresh interpreter would make twenty trials take minutes.
Instead one server process imports qtrain once and forks a child per attempt. Each child runs
the real command line entry point (`qtrain.cli.main`, what `python -m qtrain` runs) and dies
to a real SIGKILL, so what it leaves on disk is exactly what a pre-empted job leaves. The
server runs no tensor ops itself, so children do not inherit a started OpenMP pool.

The server reads one JSON request per line on stdin and answers one JSON line on stdout:

    → {"argv": [...], "log": path, "limit": s, "kill_after": s, "kill_at_write": [folder, k]}
    ← {"code": exit code (-9 when killed), "seconds": wall time of the child}

With `kill_after`, the child is killed that many seconds after it starts. With
`kill_at_write`, it is killed as soon as its k-th checkpoint write is seen in progress in that
folder (a `.checkpoint.pt.*.tmp` temporary exists), which aims the kill at a write, without
any hook in qtrain, and ties it to progress rather than to the machine's speed. `limit`
bounds every attempt: a child still running then is killed too.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

WRITE_IN_PROGRESS = ".checkpoint.pt.*.tmp"
WATCH_POLL_S = 0.0005  # short enough to land inside a ~ms checkpoint write


def _run_child(argv: list[str], log: str) -> None:
    """Body of a forked child: the CLI with stdout/stderr into `log`; never returns."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    code = 1
    try:
        from qtrain.cli import main

        code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pidfd: int, seconds: float) -> bool:
    """True when the child exited within `seconds`."""
    ready, _, _ = select.select([pidfd], [], [], max(seconds, 0.0))
    return bool(ready)


def _serve_one(request: dict) -> dict:
    sys.stdout.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _run_child(request["argv"], request["log"])
    pidfd = os.pidfd_open(pid)
    limit = request["limit"]
    try:
        if request.get("kill_at_write"):
            exited = _wait_for_write(pidfd, *request["kill_at_write"], started + limit)
        else:
            exited = _wait(pidfd, min(request.get("kill_after") or limit, limit))
        if not exited:
            # The child is not reaped until waitpid below, so this pid is still ours.
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    return {"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - started}


def _wait_for_write(pidfd: int, folder: str, count: int, deadline: float) -> bool:
    """Poll until the `count`-th checkpoint temporary appears (False) or the child exits."""
    seen: set[str] = set()
    while time.perf_counter() < deadline:
        seen.update(path.name for path in Path(folder).glob(WRITE_IN_PROGRESS))
        if len(seen) >= count:
            return False
        if _wait(pidfd, WATCH_POLL_S):
            return True
    return False


def serve() -> None:
    """The server loop (``python tests/crash_harness.py``)."""
    # Imported once, before any fork: torch.optim pulls in torch._dynamo lazily, and building
    # the parser imports every command's module; each takes seconds.
    import torch._dynamo  # noqa: F401

    import qtrain.cli
    import qtrain.train.distributed  # noqa: F401
    import qtrain.train.trainer  # noqa: F401

    qtrain.cli.build_parser()

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_serve_one(json.loads(line))), flush=True)


class CrashServer:
    """Client side: starts the server and sends it attempts; use as a context manager."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._read()

    def _read(self) -> dict:
        # Every request is bounded by its limit, so a missing answer means the server died.
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the crash harness server stopped answering")
        return json.loads(line)

    def attempt(
        self,
        argv: list[str],
        log: Path,
        limit: float,
        kill_after: float | None = None,
        kill_at_write: tuple[Path, int] | None = None,
    ) -> dict:
        """Run `qtrain` with `argv`; kill it after `kill_after` s or at write k in a folder."""
        request = {
            "argv": [str(a) for a in argv],
            "log": str(log),
            "limit": limit,
            "kill_after": kill_after,
            "kill_at_write": [str(kill_at_write[0]), kill_at_write[1]] if kill_at_write else None,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> CrashServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    serve()
