"""File sizes of a model saved as float tensors vs bit-packed, measured on disk side by side.

Writes, for one model whose quantized weights are on the grid (a trained checkpoint, or by
default a fresh model whose quantized weights are Rademacher ±Δ, as SR-ADAM starts: packed
sizes do not depend on the values):

- float.safetensors   model.state_dict() as float tensors (the baseline)
- checkpoint.pt       a qtrain checkpoint of the same weights (`save_checkpoint`)
- packed.safetensors  `qtrain export --format packed`: quantized weights as packed codes
- packed.onnx         `qtrain export --format onnx`: packed codes unpacked inside the graph
- float.onnx          `qtrain export --format onnx --onnx-weights float`: float constants

and prints the five file sizes, the bytes and ratio of the quantized (conv) weights alone,
and the overall ratio float.safetensors / packed.safetensors.

Run:  python benchmarks/bench_export_size.py [--model vgg9] [--grid binary] [--width 1.0]
                                              [--policy conv] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from qtrain import methods, models
from qtrain.export import export_onnx, input_shape, save_packed, summarize
from qtrain.export.summary import human_bytes
from qtrain.quant import Grid, parse_grid
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.rebuild import build_model


def fresh_record(name: str, grid: str, width: float, policy: str) -> dict:
    """Checkpoint record of a new model whose quantized weights are Rademacher ±Δ."""
    model = models.create(name, width=width)
    methods.create("sr-adam", model, lr=0.01, grid=grid, policy=policy)
    return {
        "model": {"name": name, "num_classes": 10, "width": width, "in_channels": 3},
        "method": {"name": "sr-adam", "grid": parse_grid(grid).to_dict(), "policy": policy},
        "quantized": methods.quantized_parameter_names(model, policy),
        "model_state": model.state_dict(),
        "config": {},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg9", choices=models.list_models())
    parser.add_argument("--grid", default="binary", help="binary, ternary or <k>bit")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--policy", default="conv", choices=methods.POLICIES)
    parser.add_argument("--checkpoint", type=Path, help="measure this checkpoint instead")
    args = parser.parse_args()

    record = (
        load_checkpoint(args.checkpoint)
        if args.checkpoint
        else fresh_record(args.model, args.grid, args.width, args.policy)
    )
    grid = Grid.from_dict(record["method"]["grid"])
    with tempfile.TemporaryDirectory() as folder:
        files = {
            "float.safetensors": Path(folder) / "float.safetensors",
            "checkpoint.pt": Path(folder) / "checkpoint.pt",
            "packed.safetensors": Path(folder) / "packed.safetensors",
            "packed.onnx": Path(folder) / "packed.onnx",
            "float.onnx": Path(folder) / "float.onnx",
        }
        state = {k: v.contiguous() for k, v in record["model_state"].items()}
        save_file(state, files["float.safetensors"])
        save_checkpoint(
            files["checkpoint.pt"], {k: v for k, v in record.items() if k != "training"}
        )
        save_packed(files["packed.safetensors"], record)
        model = build_model(record)
        for weights in ("packed", "float"):
            export_onnx(
                model,
                files[f"{weights}.onnx"],
                input_shape(record),
                quantized=record["quantized"],
                grid=grid,
                weights=weights,
            )
        sizes = {label: path.stat().st_size for label, path in files.items()}

    summary = summarize(model, record["quantized"], grid, scale=None)
    spec = record["model"]
    print(
        f"{spec['name']} (width {spec['width']:g}), grid {grid.describe()}: {summary.quantized:,} "
        f"of {summary.params:,} parameters quantized, {summary.buffers:,} buffer values"
    )
    for label, size in sizes.items():
        print(f"  {label:<20} {size:>12,} bytes  {human_bytes(size):>10}")
    print(
        f"  quantized weights    {summary.quantized_float_bytes:>12,} -> "
        f"{summary.quantized_packed_bytes:,} bytes: {summary.quantized_ratio:.2f}x smaller"
    )
    onnx_extra = sizes["packed.onnx"] / sizes["packed.safetensors"] - 1
    print(f"  packed.onnx is {onnx_extra:+.1%} the size of packed.safetensors")
    print(
        f"  whole file           {sizes['float.safetensors']:>12,} -> "
        f"{sizes['packed.safetensors']:,} bytes: "
        f"{sizes['float.safetensors'] / sizes['packed.safetensors']:.2f}x smaller"
    )


if __name__ == "__main__":
    main()
