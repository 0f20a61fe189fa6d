"""ONNX export of a model in eval mode, for onnxruntime and other ONNX runtimes.

The graph has one input `images` float32 [batch, C, H, W] (normalised like the training
data) and one output `logits` float32 [batch, classes]; the batch axis is dynamic, C, H, W
are fixed at export. Weights are float constants (initializers). BatchNorm is kept as its
own node rather than folded into the convolution before it, so every quantized weight is
stored in the graph exactly as on its grid (e.g. only ±Δ for a binary grid) and the graph
can be checked for that. The classic TorchScript-based exporter (`dynamo=False`) is used:
it needs no extra packages; the opset defaults to 17.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from qtrain.base.io import atomic_write_bytes
from qtrain.base.optional import require

DEFAULT_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def input_shape(record: dict) -> tuple[int, int, int]:
    """Default (C, H, W) input of the model a checkpoint record describes."""
    from qtrain.models import model_info

    side = model_info(record["model"]["name"]).input_size
    return (int(record["model"]["in_channels"]), side, side)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    shape: tuple[int, int, int],
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export `model` (switched to eval mode) for inputs [batch, *shape] to `path`, atomically.

    The exported graph is checked with `onnx.checker` before anything is written.
    """
    onnx = require("onnx", "export", "ONNX export")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"ONNX opset must be >= {DEFAULT_OPSET}, got {opset}; use a newer opset")
    model.eval()
    example = torch.zeros(1, *shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose; its advice on constant folding concerns
        # models in training mode, and its notes on Slice folding are harmless.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE,  # keeps BN unfolded (see above)
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write_bytes(path, data)
