"""Training an experiment's cells in worker processes: `run_cells(cells, folder, jobs=N)`.

Up to N cells train at once, each in its own process. A cell starts when a worker is free and
every cell it `needs` (by path: a float run it starts from, a teacher) has finished, in the
order of the list otherwise. Workers are spawned, not forked: PyTorch's thread pools do not
survive a fork. Each worker prints its lines prefixed with its cell's path. A cell trains in
a worker exactly as it would in the calling process (`runner.train_cell`): the numbers of a
run do not depend on `jobs`, only the wall time does. With one intra-op thread per cell (the
experiments' default on a shared machine), N = the number of cores keeps every core busy.
A script that calls it with N > 1 guards its entry point with `if __name__ == "__main__":`,
as any program that spawns processes must: each worker imports the script again.

Failures and interruptions leave nothing half-done:

- a cell that fails stops new cells from starting; the running ones finish (or checkpoint),
  then the failure is raised in the caller: a user error as itself (one line), anything
  else as `CellFailed` carrying the worker's traceback;
- SIGINT or SIGTERM to the caller is passed on to every worker; each saves its checkpoint
  and stops as a single run does, and the caller raises `TrainingInterrupted` once all have;
- a worker whose caller dies (SIGKILL) receives SIGTERM from the kernel (Linux's
  PR_SET_PDEATHSIG), so it checkpoints and stops instead of training on as an orphan that
  holds its folder's lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import traceback
from multiprocessing.connection import wait
from pathlib import Path

from qtrain.train import rundir


class CellFailed(RuntimeError):
    """A cell's training raised something other than a user error; the message holds the
    worker's traceback."""


def _die_with_parent() -> None:
    """Ask the kernel to send this process SIGTERM when its parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _worker(config, run_dir: str, resume: bool, label: str, conn) -> None:
    """Train one cell and send back ("ok" | "interrupted" | "error", detail)."""
    _die_with_parent()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    from qtrain.experiments import runner
    from qtrain.train.trainer import TrainingInterrupted

    def log(*args, **kwargs) -> None:
        kwargs.pop("end", None)
        text = " ".join(str(a) for a in args).rstrip("\n")
        for line in text.splitlines() or [""]:
            print(f"[{label}] {line}", flush=True)

    try:
        runner.train_cell(config, Path(run_dir), resume, log)
        outcome = ("ok", None)
    except TrainingInterrupted as stop:
        outcome = ("interrupted", int(stop.args[0]) if stop.args else int(signal.SIGINT))
    except BaseException as error:  # sent to the caller, which decides how to report it
        outcome = ("error", _portable(error))
    try:
        conn.send(outcome)
    except Exception:  # an error whose state does not pickle: send its traceback instead
        conn.send(("error", CellFailed("".join(traceback.format_exception(outcome[1])))))
    conn.close()


def _portable(error: BaseException):
    """A user error (`USER_ERROR_TYPES`: those that name settings pickle with their
    template) or a refused write (an OSError) as itself, so the caller reports it in one
    line; anything else as a `CellFailed` holding its traceback."""
    from qtrain.base.errors import USER_ERROR_TYPES

    if isinstance(error, (*USER_ERROR_TYPES, OSError)):
        return error
    return CellFailed("".join(traceback.format_exception(error)).rstrip())


def train_in_parallel(jobs: list, folder: Path, workers: int, log=print) -> None:
    """Train `jobs` ((cell, resume) pairs, in order) with at most `workers` at once, each
    after the cells it needs have finished (module docstring); raises the first failure, or
    `TrainingInterrupted` when a signal stopped them."""
    from qtrain.train.trainer import TrainingInterrupted

    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    running: dict[int, tuple] = {}  # sentinel → (cell, process, connection)
    failures: list[BaseException] = []
    stop: list[int] = []

    def forward(signum, _frame) -> None:
        stop.append(signum)
        for _, process, _ in running.values():
            with contextlib.suppress(ProcessLookupError):
                process.kill() if signum == signal.SIGKILL else process.terminate()

    def ready(cell) -> bool:
        return all(rundir.is_finished(folder / need) for need in cell.needs)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while not failures and not stop and len(running) < workers:
                job = next((j for j in pending if ready(j[0])), None)
                if job is None:
                    break
                pending.remove(job)
                cell, resume = job
                log(f"{'resume' if resume else 'train'} {folder / cell.path}")
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_worker,
                    args=(cell.config, str(folder / cell.path), resume, cell.path, send),
                    name=f"qtrain-{cell.path}",
                )
                process.start()
                send.close()
                running[process.sentinel] = (cell, process, receive)
            if not running:
                break  # the rest wait on a failed or interrupted cell
            for sentinel in wait(list(running)):
                cell, process, receive = running.pop(sentinel)
                process.join()
                try:
                    kind, detail = receive.recv()
                except EOFError:  # it ended without a word: killed, or crashed in start-up
                    kind, detail = "lost", process.exitcode
                except Exception as unreadable:  # a report that does not unpickle here
                    kind, detail = (
                        "error",
                        CellFailed(
                            f"the worker training {cell.path} failed with an error that could "
                            f"not be passed back ({unreadable!r}); run the cell alone to see it"
                        ),
                    )
                receive.close()
                if kind == "error":
                    failures.append(detail)
                elif kind == "interrupted":
                    stop.append(detail)
                elif kind == "lost" and not stop:  # killed before reporting, unasked
                    failures.append(CellFailed(
                        f"the worker training {cell.path} ended with exit code {detail} "
                        "before reporting; run the same command again to resume it"
                    ))  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failures:
        raise failures[0]
    if stop:
        raise TrainingInterrupted(stop[0])
    if pending:  # a need that no cell of the list makes: a programming error of the caller
        names = ", ".join(c.path for c, _ in pending)
        raise ValueError(f"cells {names} need cells that are neither finished nor listed")
