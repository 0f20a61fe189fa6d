"""The `qtrain export` and `qtrain summary` commands (argument wiring only).

    qtrain export SOURCE --format packed --out model.safetensors
    qtrain export SOURCE --format onnx --out model.onnx [--input-size 32] [--opset 17]
    qtrain export SOURCE --format hf --out FOLDER [--bitnet]     (a run of model hf)
    qtrain summary TARGET [--json] [--grid binary --policy conv --scale none --width 1.0
                          --activations float ...]

SOURCE is a checkpoint (file or run folder) or a packed file; TARGET is either of those or a
registered model name (then the policy's parameters are counted as quantized on the grid).
This module holds the argument wiring only; loading and summarising live in
`qtrain.export.loading`. User errors are raised as ValueError / FileNotFoundError (or
`MissingDependencyError`, an ImportError, for an extra that is not installed) with one
sentence; the main CLI prints it. `export` holds the lock of the folder it writes into
(`qtrain.base.folder_lock`), so it never writes into a run folder that is training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.folder_lock import FolderLock
from qtrain.export.hf import WEIGHTS_FILE, export_hf
from qtrain.export.loading import MODEL_OPTIONS, load_any_model, summary_of, summary_of_target
from qtrain.export.onnx import (
    DEFAULT_OPSET,
    WEIGHT_FORMATS,
    export_onnx,
    input_shape,
    reads_tokens,
)
from qtrain.export.packed import float_phase_refusal, save_packed
from qtrain.export.summary import human_bytes
from qtrain.quant import Grid

FORMATS = ("packed", "onnx", "hf")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `export` and `summary` on the main CLI's subparsers."""
    export = subparsers.add_parser(
        "export",
        help="write a checkpoint as a bit-packed safetensors file, as ONNX or as a Hugging "
        "Face folder",
        description="Write a checkpoint (or packed file) as a bit-packed safetensors file "
        "(1 bit per binary weight), as an ONNX model that onnxruntime runs, or (a run of "
        "model hf) as a folder that transformers' from_pretrained loads.",
    )
    export.add_argument("source", help="checkpoint file, run folder or packed file")
    export.add_argument("--format", required=True, choices=FORMATS, help="output format")
    export.add_argument(
        "--out", required=True, type=Path, help="file to write (hf: a folder, new or empty)"
    )
    export.add_argument(
        "--input-size",
        type=int,
        help="ONNX input side in pixels, or a language model's sequence length "
        "(default: the model's own)",
    )
    export.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 17)")
    export.add_argument(
        "--onnx-weights",
        choices=WEIGHT_FORMATS,
        default="packed",
        help="ONNX: quantized weights as packed codes unpacked in the graph (default), "
        "or as float constants",
    )
    export.add_argument(
        "--bitnet",
        action="store_true",
        help="hf: write transformers' bitnet format also for a run whose activations are not "
        "8-bit (its BitLinear quantizes them to 8 bits, so the logits differ)",
    )
    export.set_defaults(func=run_export)

    summary = subparsers.add_parser(
        "summary",
        help="per-layer parameters, bits and bytes, float vs packed",
        description="Per-layer storage table of a checkpoint, packed file or registered model: "
        "parameters, buffers, bits per weight, bytes as float tensors and bit-packed (with "
        "the scales of scaled weights); binary activations store nothing.",
    )
    summary.add_argument("target", help="checkpoint, packed file or registered model name")
    summary.add_argument("--json", action="store_true", help="print JSON instead of a table")
    model_options = summary.add_argument_group("for a model name only")
    model_options.add_argument("--grid", help="grid: binary, ternary or <k>bit (default binary)")
    model_options.add_argument(
        "--policy", help="quantized parameters: conv, conv-except-first, conv+linear, linear, all"
    )
    model_options.add_argument(
        "--scale", help="none (default) or a scaled grid (he, absmean, absmean-tensor)"
    )
    model_options.add_argument("--width", type=float, help="channel width multiplier (1.0)")
    model_options.add_argument("--num-classes", type=int, help="output classes (10)")
    model_options.add_argument("--in-channels", type=int, help="input channels (3)")
    model_options.add_argument("--activations", help="float (default) or binary")
    summary.set_defaults(func=run_summary)


def run_export(args: argparse.Namespace) -> int:
    source, out = Path(args.source), Path(args.out)
    written = source / "checkpoint.pt" if source.is_dir() else source
    if out.exists() and written.exists() and out.resolve() == written.resolve():
        raise UserError(f"--out {out} is the source file itself; choose another output path")
    with FolderLock(out.parent):
        return _export(args, source, out)


def _export(args: argparse.Namespace, source: Path, out: Path) -> int:
    """Write `source` as `args.format` to `out`, then print one line on what was written."""
    if args.format == "hf":
        return _export_hf(source, out, args.bitnet)
    if args.bitnet:
        raise UserError("--bitnet applies to --format hf only; leave it out")
    model, record = load_any_model(source)
    if args.format == "packed":
        save_packed(out, record)
        summary = summary_of(model, record)
        size = out.stat().st_size
        print(
            f"wrote {out}: {human_bytes(size)} ({size:,} bytes), {summary.float_bytes / size:.2f}x "
            f"smaller than its {human_bytes(summary.float_bytes)} of float tensors"
        )
        return 0
    shape, tokens = input_shape(record), reads_tokens(record)
    if args.input_size is not None:
        unit = "tokens" if tokens else "pixels"
        if args.input_size < 1 or (tokens and args.input_size > shape[0]):
            limit = f" (at most the context, {shape[0]})" if tokens else ""
            raise UserError(
                f"--input-size must be a positive number of {unit}{limit}, got {args.input_size}"
            )
        shape = (args.input_size,) if tokens else (shape[0], args.input_size, args.input_size)
    grid = Grid.from_dict(record["method"]["grid"])
    try:
        export_onnx(
            model,
            out,
            shape,
            opset=args.opset,
            quantized=record["quantized"],
            grid=grid,
            weights=args.onnx_weights,
            tokens=tokens,
        )
    except UserError as e:  # packed weights off the grid: say why when the run can say it
        where = f"the quantized weights are not all on the grid {grid.describe()}"
        reason = float_phase_refusal(where, record) if grid.bounded else None
        if reason is None:
            raise
        raise reason from e
    kind = "tokens" if tokens else "images"
    print(
        f"wrote {out}: {human_bytes(out.stat().st_size)}, input {kind} [batch, "
        f"{', '.join(map(str, shape))}], output logits, opset {args.opset}, "
        f"{args.onnx_weights} weights"
    )
    return 0


def _export_hf(source: Path, out: Path, bitnet: bool) -> int:
    """`qtrain.export.hf.export_hf`, then its notes and one line on what was written."""
    written = export_hf(source, out, bitnet=bitnet)
    for note in written.notes:
        print(note)
    size = (out / WEIGHTS_FILE).stat().st_size
    print(
        f"wrote {out}: transformers folder, {written.layout} weights ({WEIGHTS_FILE} "
        f"{human_bytes(size)}), tokenizer {written.tokenizer}"
    )
    return 0


def run_summary(args: argparse.Namespace) -> int:
    summary = summary_of_target(
        args.target, **{k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    )
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.format_table())
    return 0
