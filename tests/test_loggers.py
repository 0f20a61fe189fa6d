"""Metric loggers: TensorBoard files read back with tensorboard's own event reader."""

from __future__ import annotations

import pytest
import torch

from qtrain.train import loggers

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def read_events(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / loggers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_scalars_and_histogram_read_back(tmp_path):
    logger = loggers.create("tensorboard", tmp_path)
    records = [
        {"epoch": 1, "train_loss": 2.25, "test_error": 61.5, "lr": 0.01, "wb_wr_gap": None},
        {"epoch": 2, "train_loss": 1.75, "test_error": 48.25, "lr": 0.001, "wb_wr_gap": None},
    ]
    for r in records:
        logger.log_metrics(r["epoch"], r)
    values = torch.linspace(-1, 1, 101)
    logger.log_histogram("latent_weights", values, 2)
    logger.close()

    events = read_events(tmp_path)
    assert set(events.Tags()["scalars"]) == {"train_loss", "test_error", "lr"}
    assert scalars(events, "train_loss") == [(1, 2.25), (2, 1.75)]
    assert scalars(events, "test_error") == [(1, 61.5), (2, 48.25)]
    assert [s for s, _ in scalars(events, "lr")] == [1, 2]
    assert scalars(events, "lr")[1][1] == pytest.approx(0.001)
    (hist,) = events.Histograms("latent_weights")
    assert hist.step == 2
    assert hist.histogram_value.num == 101
    assert hist.histogram_value.min == -1.0 and hist.histogram_value.max == 1.0
    assert hist.histogram_value.sum == pytest.approx(0.0, abs=1e-5)


def test_resumed_logger_drops_points_the_interrupted_attempt_logged(tmp_path):
    first = loggers.create("tensorboard", tmp_path)
    for step in (1, 2, 3):
        first.log_metrics(step, {"train_loss": float(step)})
    first.close()
    # The checkpoint holds 2 epochs: epoch 3 is trained again and logged with a new value.
    resumed = loggers.create("tensorboard", tmp_path, first_step=3)
    resumed.log_metrics(3, {"train_loss": 30.0})
    resumed.close()
    assert scalars(read_events(tmp_path), "train_loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_null_logger_writes_nothing(tmp_path):
    logger = loggers.create("none", tmp_path)
    logger.log_metrics(1, {"train_loss": 1.0})
    logger.log_histogram("x", torch.zeros(3), 1)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_logger_is_named_with_a_suggestion(tmp_path):
    suggestion = r"unknown logger 'tensorbord' \(did you mean 'tensorboard'"
    with pytest.raises(ValueError, match=suggestion):
        loggers.create("tensorbord", tmp_path)
