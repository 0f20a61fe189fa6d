"""Training an experiment's cells in worker processes: `run_cells(cells, folder, jobs=N)`.

Up to N cells train at once, in N worker processes that each train one cell after another
(the interpreter and PyTorch start once per worker). A cell starts when a worker is free and
every cell it `needs` (by path: a float run it starts from, a teacher) has finished, in the
order of the list otherwise. Workers are spawned, not forked: PyTorch's thread pools do not
survive a fork. Each worker prints its lines prefixed with its cell's path. A cell trains in
a worker exactly as it would in the calling process (`trainer.train`): the numbers of a
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


def _serve(conn) -> None:
    """A worker's life: train each cell the caller sends, (config, run dir, resume, label,
    echo), and send back ("ok" | "interrupted" | "error", detail), until it sends None."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group: while training, the trainer turns it into a
    # checkpoint and a stop; between cells the caller decides, so the worker ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    while (task := conn.recv()) is not None:
        outcome = _train(*task)
        try:
            conn.send(outcome)
        except Exception:  # an error whose state does not pickle: send its traceback instead
            conn.send(("error", CellFailed("".join(traceback.format_exception(outcome[1])))))
    conn.close()


def _train(config, run_dir: str, resume: bool, label: str, echo: bool) -> tuple:
    """Train one cell in this worker (its lines printed when `echo`); its outcome as `_serve`
    sends it."""
    from qtrain.train.trainer import TrainingInterrupted, train

    def log(*args, **kwargs) -> None:
        if not echo:
            return
        text = " ".join(str(a) for a in args).rstrip("\n")
        for line in text.splitlines() or [""]:
            print(f"[{label}] {line}", flush=True)

    try:
        # no progress bars: several workers share one terminal; the trainer logs a progress
        # line every 30 s instead
        train(config, Path(run_dir), resume=resume, log=log, progress=False)
        return ("ok", None)
    except TrainingInterrupted as stop:
        return ("interrupted", int(stop.args[0]) if stop.args else int(signal.SIGINT))
    except BaseException as error:  # sent to the caller, which decides how to report it
        return ("error", _portable(error))


def _portable(error: BaseException):
    """A user error (`USER_ERROR_TYPES`: those that name settings pickle with their
    template) or a refused write (an OSError) as itself, so the caller reports it in one
    line; anything else as a `CellFailed` holding its traceback."""
    from qtrain.base.errors import USER_ERROR_TYPES

    if isinstance(error, (*USER_ERROR_TYPES, OSError)):
        return error
    return CellFailed("".join(traceback.format_exception(error)).rstrip())


class _Worker:
    """A spawned process that trains the cells it is sent, one at a time: the interpreter and
    PyTorch start once per worker, not once per cell."""

    def __init__(self, context) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="qtrain-cells")
        self.process.start()
        child.close()  # the caller keeps one end: the worker's death is an EOF on it
        self.cell = None

    def start(self, cell, run_dir: Path, resume: bool, echo: bool) -> None:
        self.cell = cell
        self.conn.send((cell.config, str(run_dir), resume, cell.path, echo))

    def outcome(self) -> tuple:
        """What the worker reports for its cell (blocking); ("lost", exit code) when it died."""
        try:
            return self.conn.recv()
        except EOFError:  # it ended without a word: killed, or crashed in start-up
            self.process.join()
            return ("lost", self.process.exitcode)
        except Exception as unreadable:  # a report that does not unpickle here
            return ("error", CellFailed(
                f"the worker training {self.cell.path} failed with an error that could not "
                f"be passed back ({unreadable!r}); run the cell alone to see it"
            ))  # fmt: skip

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill() if signum == signal.SIGKILL else self.process.terminate()

    def close(self) -> None:
        """Ask an idle worker to leave; stop one that does not within a few seconds."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


def train_in_parallel(jobs: list, folder: Path, workers: int, log=print, echo: bool = True) -> None:
    """Train `jobs` ((cell, resume) pairs, in order) with at most `workers` at once, each
    after the cells it needs have finished (module docstring); the workers print their cells'
    lines when `echo`. Raises the first failure, or `TrainingInterrupted` when a signal
    stopped them."""
    from qtrain.train.trainer import TrainingInterrupted

    context = multiprocessing.get_context("spawn")
    pending = list(jobs)
    failures: list[BaseException] = []
    stop: list[int] = []
    pool = [_Worker(context) for _ in range(min(workers, len(jobs)))]
    idle, busy = list(pool), {}  # busy: connection → worker

    def forward(signum, _frame) -> None:
        stop.append(signum)
        for worker in busy.values():
            worker.signal(signum)

    def ready(cell) -> bool:
        return all(rundir.is_finished(folder / need) for need in cell.needs)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            while not failures and not stop and idle:
                job = next((j for j in pending if ready(j[0])), None)
                if job is None:
                    break
                pending.remove(job)
                cell, resume = job
                log(f"{'resume' if resume else 'train'} {folder / cell.path}")
                worker = idle.pop()
                worker.start(cell, folder / cell.path, resume, echo)
                busy[worker.conn] = worker
            if not busy:
                break  # all done, or the rest wait on a failed or interrupted cell
            for conn in wait(list(busy)):
                worker = busy.pop(conn)
                kind, detail = worker.outcome()
                if kind == "ok":
                    idle.append(worker)
                elif kind == "error":
                    failures.append(detail)
                    idle.append(worker)
                elif kind == "interrupted":
                    stop.append(detail)
                    idle.append(worker)
                elif not stop:  # "lost": killed before reporting, unasked
                    failures.append(CellFailed(
                        f"the worker training {worker.cell.path} ended with exit code "
                        f"{detail} before reporting; run the same command again to resume it"
                    ))  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in pool:
            worker.close()
    if failures:
        raise failures[0]
    if stop:
        raise TrainingInterrupted(stop[0])
    if pending:  # a need that no cell of the list makes: a programming error of the caller
        names = ", ".join(c.path for c, _ in pending)
        raise ValueError(f"cells {names} need cells that are neither finished nor listed")
