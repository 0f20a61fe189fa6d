"""ONNX export of a model in eval mode, for onnxruntime and other ONNX runtimes.

The graph has one input `images` float32 [batch, C, H, W] (normalised like the training
data) and one output `logits` float32 [batch, classes]; the batch axis is dynamic, C, H, W
are fixed at export. A language model's graph reads `tokens` int64 [batch, time] and gives
`logits` [batch, time, vocabulary], both axes dynamic. Two ways to store the quantized
weights (`weights=`):

    packed  (default) each quantized weight as its packed codes (1 bit per binary weight,
            2 per ternary, k per k-bit) plus its level table and scale(s), unpacked inside the
            graph by standard operators (`qtrain.export.unpack_graph`); the file is about as
            small as the packed safetensors file plus the float layers
    float   every weight as a float constant, for runtimes that prefer plain initializers

Either way the weights the runtime computes with are exactly the trained ones. A model with
activation quantization (`qtrain.models.act_quant`) carries its quantizer in the graph as Abs,
ReduceMax, Clip, Reciprocal, Mul, Round (half to even, as torch.round), Clip and Div, each a
correctly rounded float32 operation, so it rounds as PyTorch does given the same input; its
RMSNorm's mean and the matrix products sum in the runtime's own order, so an input within an
ulp of a rounding boundary can land one level away (docs/lm.md). BatchNorm is
kept as its own node rather than folded into the convolution before it (and constant folding
is off for packed weights, or the exporter would fold the unpacking back into floats). The
classic TorchScript-based exporter (`dynamo=False`) is used: it needs no extra packages; the
opset defaults to 17.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_bytes
from qtrain.base.names import unknown_name
from qtrain.base.optional import require
from qtrain.export.unpack_graph import pack_into_model, packed_weights
from qtrain.quant import Grid

DEFAULT_OPSET = 17
INPUT_NAME = "images"
TOKENS_NAME = "tokens"
OUTPUT_NAME = "logits"
WEIGHT_FORMATS = ("packed", "float")


def reads_tokens(record: dict) -> bool:
    """True when the checkpoint's model reads token ids (a language model), not images."""
    from qtrain.models import model_info

    return model_info(record["model"]["name"]).modality == "text"


def input_shape(record: dict) -> tuple[int, ...]:
    """Default input of the model a checkpoint record describes, without the batch axis:
    (C, H, W) for an image model, (T,) = its context length for a language model."""
    from qtrain.models import create, model_info

    spec = record["model"]
    if reads_tokens(record):
        model = create(spec["name"], int(spec["num_classes"]), options=spec.get("options") or {})
        return (int(model.config.block_size),)
    side = model_info(spec["name"]).input_size
    return (int(spec["in_channels"]), side, side)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    shape: tuple[int, ...],
    opset: int = DEFAULT_OPSET,
    *,
    quantized: list[str] = (),
    grid: Grid | None = None,
    weights: str = "packed",
    tokens: bool = False,
) -> None:
    """Export `model` (switched to eval mode) for inputs [batch, *shape] to `path`, atomically.

    Images: input `images` float32 [batch, C, H, W]. With `tokens`, a language model: input
    `tokens` int64 [batch, time] (time ≤ the context length), output `logits`
    [batch, time, vocabulary]; batch and time are dynamic.

    With `weights="packed"` the parameters named in `quantized` (each on `grid`, or on `grid`
    with one scale or one per output channel) are stored packed; `model` itself is not changed.
    The graph is checked with `onnx.checker` before anything is written.
    """
    onnx = require("onnx", "export", "ONNX export")
    if opset < DEFAULT_OPSET:
        raise UserError(f"ONNX opset must be >= {DEFAULT_OPSET}, got {opset}; use a newer opset")
    if weights not in WEIGHT_FORMATS:
        raise unknown_name("ONNX weight format", weights, WEIGHT_FORMATS)
    model.eval()
    packed = weights == "packed" and bool(quantized)
    if packed:
        if grid is None:
            raise UserError("packed ONNX weights need the grid the quantized weights live on")
        parameters = dict(model.named_parameters())
        model = pack_into_model(
            copy.deepcopy(model), packed_weights({n: parameters[n] for n in quantized}, grid)
        )
    if tokens:
        example = torch.zeros(1, *shape, dtype=torch.int64)
        input_name, axes = TOKENS_NAME, {0: "batch", 1: "time"}
    else:
        example, input_name, axes = torch.zeros(1, *shape), INPUT_NAME, {0: "batch"}
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
            do_constant_folding=not packed,
            input_names=[input_name],
            output_names=[OUTPUT_NAME],
            dynamic_axes={input_name: axes, OUTPUT_NAME: axes},
        )
    graph = onnx.load_from_string(buffer.getvalue())
    compact_names(graph.graph)
    onnx.checker.check_model(graph)
    atomic_write_bytes(path, graph.SerializeToString())


def compact_names(graph) -> None:
    """Give every intermediate value a short name and drop node names (in place).

    The exporter names values after the module path ("/features/features.8/weight_packed/
    Slice_output_0"); in a graph that unpacks its weights those names would outweigh the packed
    weights of a small model. Inputs, outputs and initializers keep their names.
    """
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    keep |= {t.name for t in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[i] = f"v{len(renamed)}"
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
