"""Rebuilding the model a checkpoint record describes, with the weights its run reported.

`build_model(record)` creates the registered model named in `record["model"]`
(`qtrain.models.create` with the saved name, classes, width, input channels, activations and
options, then the activation quantization `act_quant` when the run had one:
`qtrain.models.act_quant.apply_act_quant`), loads `record["model_state"]` into it and returns
it in eval mode. Which weights it holds is chosen by `weights`:

    "reported"  the weights the run's numbers were measured with: for a run that kept a weight
                average (`ema_decay`), the average's evaluated weights, s·Q_d(e/s) on the grid
                for every quantized tensor and e for the others
                (`qtrain.train.ema.evaluated_weights`); else the live weights
    "live"      the live weights (those a resumed run continues from)

A record whose weights do not fit its model raises `CheckpointError`, as a damaged file does.
Reading and validating the file itself is `qtrain.train.checkpoint`'s job.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain import models
from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name
from qtrain.models.act_quant import apply_act_quant
from qtrain.quant import Grid
from qtrain.train.checkpoint import CheckpointError
from qtrain.train.ema import evaluated_weights

WEIGHT_CHOICES = ("reported", "live")


# What building a model from a damaged description raises (RuntimeError and MemoryError: its
# sizes ask for more memory than there is).
BUILD_ERRORS = (KeyError, TypeError, ValueError, AttributeError, OverflowError, RuntimeError,
                MemoryError)  # fmt: skip


def build_failure(error: BaseException) -> str:
    """Why a model could not be built from a stored description, in a few words."""
    if isinstance(error, KeyError):
        return f"no {error}"
    if isinstance(error, MemoryError) or "allocate" in str(error):
        return "its sizes need more memory than there is"
    return " ".join(str(error).split())[:160]


def build_model(record: dict, weights: str = "reported") -> nn.Module:
    """The model `record` describes, in eval mode, holding its `weights` ("reported" or
    "live", see the module docstring)."""
    spec = record["model"]
    try:
        model = models.create(
            spec["name"],
            num_classes=int(spec["num_classes"]),
            width=float(spec["width"]),
            in_channels=int(spec["in_channels"]),
            activations=spec.get("activations", "float"),
            options=spec.get("options") or {},
        )
    except UserError:  # an unknown name, an impossible width: its own sentence says it
        raise
    except BUILD_ERRORS as e:
        reason = build_failure(e)
        raise CheckpointError(
            f"the checkpoint describes a model that cannot be built ({reason}); the file is "
            "damaged or was edited"
        ) from None
    try:
        apply_act_quant(model, spec.get("act_quant"))
    except UserError as e:
        raise CheckpointError(
            f"the checkpoint's activation quantization does not fit model {spec['name']!r} "
            f"({str(e)[:160]}); the file is damaged or was edited"
        ) from None
    try:
        model.load_state_dict(record["model_state"])
    except RuntimeError as e:  # its first line only says "Error(s) in loading state_dict"
        first = " ".join(str(e).split()[:24])
        raise CheckpointError(
            f"the checkpoint's weights do not fit model {spec['name']!r} ({first[:160]}); "
            "the file is damaged or was edited"
        ) from None
    if weights not in WEIGHT_CHOICES:
        raise unknown_name("weights", weights, WEIGHT_CHOICES)
    average = (record.get("training") or {}).get("ema")
    if weights == "reported" and average:
        _load_average(model, record, average)
    return model.eval()


@torch.no_grad()
def _load_average(model: nn.Module, record: dict, average: dict) -> None:
    """Overwrite `model`'s averaged tensors with the evaluated weights of `average`."""
    state = model.state_dict()
    averages = (average.get("averages") or {}) if isinstance(average, dict) else None
    if (
        not isinstance(averages, dict)
        or not set(averages) <= set(state)
        or not set(record["quantized"]) <= set(averages)
    ):
        raise CheckpointError(
            "the checkpoint's weight average does not fit its model; the file is damaged or "
            "was edited"
        )
    quantized = {name: state[name].dtype for name in record["quantized"]}
    grid = Grid.from_dict(record["method"]["grid"])
    scale = record["method"].get("scale", "none")
    for name, value in evaluated_weights(averages, quantized, grid, scale).items():
        state[name].copy_(value)
