"""Test error of a saved model: a checkpoint, a run folder, or a packed export."""

from __future__ import annotations

from pathlib import Path

import torch

from qtrain import data as qdata
from qtrain.export.loading import load_any_model
from qtrain.train.preflight import data_options
from qtrain.train.trainer import evaluate


def evaluate_file(
    path: str | Path, data_dir: str | None = None, batch_size: int = 1000, device: str = "cpu"
) -> dict:
    """Evaluate a checkpoint, run folder or packed file on its data set's test split."""
    model, record = load_any_model(path)
    config = record.get("config") or {}
    dataset = config.get("dataset")
    if not dataset:
        raise ValueError(
            f"{path} does not name the data set it was trained on; it cannot be evaluated"
        )
    options = data_options(dataset, record["model"]["name"])
    splits = qdata.load(dataset, data_dir or config.get("data_dir"), download=False, **options)
    loader = splits.loader("test", batch_size, seed=0, device=device)
    result = evaluate(model.to(torch.device(device)), loader, torch.device(device))
    return {
        "model": record["model"]["name"],
        "method": record["method"]["name"],
        "dataset": dataset,
        "images": len(splits.test),
        "test_error": result["error"],
        "test_loss": result["loss"],
    }
