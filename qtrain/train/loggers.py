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
"""

from __future__ import annotations

import math
from numbers import Real
from pathlib import Path

import torch

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
        # purge_step drops what an interrupted attempt logged after its last checkpoint.
        self.writer = tensorboard.SummaryWriter(
            str(Path(run_dir) / TENSORBOARD_DIR), purge_step=first_step or None
        )

    def log_metrics(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, Real):
                continue  # None (a metric this method lacks) and non-numbers are not scalars
            if key in ("epoch", "step") or not math.isfinite(value):
                continue
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def log_histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
