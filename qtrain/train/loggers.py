"""Metric loggers: mirror a run's records to the trackers users already watch.

`metrics.jsonl` in the run folder is always written and stays the run's own record (reports
and resume read it). A logger sends the same records elsewhere. The interface is three
methods, so that another tracker (MLflow, Weights & Biases) is one small class:

    log_metrics(step, record)        every number of `record` as a scalar at `step`
    log_histogram(tag, values, step) the distribution of a tensor (e.g. BC's latent weights)
    close()                          flush and release files

`step` is the record's number (its `epoch` field): an epoch of an image run, an evaluation of
a text run.
On resume a logger is opened with `first_step` = the next step to be logged: the TensorBoard
logger discards events written at or after it by the interrupted attempt (they are logged
again), so a resumed run's curves have no duplicated points.

Event files are appended to, not written atomically: a write that fails (a full disk) raises
an OSError naming the event folder, and may leave a torn record at the end of its file, which
TensorBoard's reader skips; the resumed run writes a new event file.
"""

from __future__ import annotations

import contextlib
import math
import threading
from numbers import Real
from pathlib import Path

import torch

from qtrain.base.io import write_error
from qtrain.base.names import unknown_name
from qtrain.base.optional import require

LOGGERS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


class NullLogger:
    """Logs nothing (the default: metrics.jsonl already holds every record)."""

    def log_metrics(self, step: int, record: dict) -> None:
        pass

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars and histograms as TensorBoard event files under `RUN/tensorboard/`."""

    def __init__(self, run_dir: str | Path, first_step: int = 0) -> None:
        tensorboard = require("torch.utils.tensorboard", "tensorboard", "log=tensorboard")
        self.folder = Path(run_dir) / TENSORBOARD_DIR
        _quiet_writer_thread_errors()
        with self._writing():
            # purge_step drops what an interrupted attempt logged after its last checkpoint.
            self.writer = tensorboard.SummaryWriter(str(self.folder), purge_step=first_step or None)

    @contextlib.contextmanager
    def _writing(self):
        """An OSError of the event writer (raised on its thread, re-raised here at the next
        write or flush) named after the event folder."""
        try:
            yield
        except OSError as error:
            raise write_error(error, self.folder) from error

    def log_metrics(self, step: int, record: dict) -> None:
        with self._writing():
            for key, value in record.items():
                if isinstance(value, bool) or not isinstance(value, Real):
                    continue  # None (a metric this method lacks) and non-numbers: no scalars
                if key in ("epoch", "step") or not math.isfinite(value):
                    continue
                self.writer.add_scalar(key, float(value), step)
            self.writer.flush()

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        with self._writing():
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)
            self.writer.flush()

    def close(self) -> None:
        with self._writing():
            self.writer.close()


def _quiet_writer_thread_errors() -> None:
    """Keep TensorBoard's writer thread from printing a traceback when a write fails: the same
    error reaches the training thread at its next write or flush, which reports it once."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args) -> None:
        thread = type(args.thread).__name__ if args.thread is not None else ""
        if not (thread == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


def check_logger(name: str) -> str:
    """`name` if it is a known logger, else ValueError with a did-you-mean."""
    if name not in LOGGERS:
        raise unknown_name("logger", name, LOGGERS)
    return name


def create(name: str, run_dir: str | Path, first_step: int = 0):
    """The logger called `name` (see LOGGERS) writing into `run_dir`."""
    check_logger(name)
    if name == "tensorboard":
        return TensorBoardLogger(run_dir, first_step)
    return NullLogger()
