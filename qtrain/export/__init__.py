"""Deployment: bit-packed safetensors files, ONNX, and model size summaries.

    save_packed(path, record)         checkpoint record → packed file (1 bit per binary weight)
    load_packed(path) -> nn.Module    packed file → model with bit-identical weights
    read_packed(path) -> (model, record)
    export_onnx(model, path, shape)   ONNX graph that onnxruntime runs
    summarize(model, quantized, grid) per-layer parameters, bits, float vs packed bytes
    load(path) -> nn.Module           a checkpoint, run folder or packed file → eval-mode model
    load_any_model(path)              a checkpoint, run folder or packed file → (model, record)
    summary_of_target(target)         summary of a file or of a registered model name
    export_hf(source, out)            a run of model hf → a folder transformers loads
                                      (its bitnet format, or float weights)

safetensors and onnx (the `export` extra) are imported only when a file is written or read.
"""

from qtrain.export.hf import HFExport, export_hf
from qtrain.export.loading import load, load_any_model, summary_of, summary_of_target
from qtrain.export.onnx import export_onnx, input_shape
from qtrain.export.packed import (
    PackedFormatError,
    is_packed_file,
    load_packed,
    read_packed,
    save_packed,
)
from qtrain.export.packing import pack_codes, packed_nbytes, unpack_codes
from qtrain.export.summary import LayerRow, Summary, summarize
from qtrain.train.sources import PACKED, register_file_reader

# init_from and distill_from name packed files too; training sits below export (a layer lower)
register_file_reader(PACKED, is_packed_file, read_packed)

__all__ = [
    "HFExport",
    "LayerRow",
    "PackedFormatError",
    "Summary",
    "export_hf",
    "export_onnx",
    "input_shape",
    "is_packed_file",
    "load",
    "load_any_model",
    "load_packed",
    "pack_codes",
    "packed_nbytes",
    "read_packed",
    "save_packed",
    "summarize",
    "summary_of",
    "summary_of_target",
    "unpack_codes",
]
