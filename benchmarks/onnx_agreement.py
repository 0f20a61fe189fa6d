"""ONNX export checked on real data: file sizes, and onnxruntime's logits against PyTorch's.

For a trained run (an image classifier or a language model) this writes, side by side:

- float.safetensors   the model's state as float tensors (the baseline)
- packed.safetensors  `qtrain export --format packed`
- packed.onnx         `qtrain export --format onnx` (packed codes unpacked inside the graph)
- float.onnx          `qtrain export --format onnx --onnx-weights float`

then runs both ONNX files with onnxruntime over the run's whole test set (CIFAR: all 10,000
test images; a text: its fixed validation windows) and prints the largest |Δlogit| against the
PyTorch model and how many predicted classes (next characters) differ.

Run:  python benchmarks/onnx_agreement.py RUN [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxruntime as ort
import torch
from safetensors.torch import save_file

from qtrain.evaluate import eval_loader
from qtrain.export import export_onnx, input_shape, load_any_model, save_packed
from qtrain.export.onnx import reads_tokens
from qtrain.export.packed import tied_names
from qtrain.export.summary import human_bytes
from qtrain.quant import Grid


def write_files(model, record: dict, out: Path) -> dict[str, Path]:
    files = {name: out / name for name in
             ("float.safetensors", "packed.safetensors", "packed.onnx", "float.onnx")}  # fmt: skip
    tied = tied_names(model.state_dict())  # a tied head is the embedding: saved once
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, files["float.safetensors"])
    save_packed(files["packed.safetensors"], record)
    for weights in ("packed", "float"):
        export_onnx(model, files[f"{weights}.onnx"], input_shape(record),
                    quantized=record["quantized"], grid=Grid.from_dict(record["method"]["grid"]),
                    weights=weights, tokens=reads_tokens(record))  # fmt: skip
    return files


@torch.no_grad()
def agreement(model, path: Path, loader, tokens: bool) -> tuple[float, int, int]:
    """(max |Δlogit|, predictions that differ, predictions made) over every batch of `loader`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = "tokens" if tokens else "images"
    worst, differ, total = 0.0, 0, 0
    for x, _ in loader.epoch(0):
        expected = model(x)
        actual = torch.from_numpy(session.run(["logits"], {name: x.contiguous().numpy()})[0])
        worst = max(worst, float((actual - expected).abs().max()))
        differ += int((actual.argmax(-1) != expected.argmax(-1)).sum())
        total += expected.argmax(-1).numel()
    return worst, differ, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="checkpoint, run folder or packed file")
    parser.add_argument("--data-dir", help="where the run's data set lives")
    parser.add_argument("--out", type=Path, help="folder for the files (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, record = load_any_model(args.run)
    model.eval()
    out = args.out or Path(tempfile.mkdtemp(prefix="qtrain-onnx-"))
    out.mkdir(parents=True, exist_ok=True)
    files = write_files(model, record, out)
    for name, path in files.items():
        size = path.stat().st_size
        print(f"{name:<20} {size:>12,} bytes  {human_bytes(size)}")
    loader, _ = eval_loader(record, args.data_dir, batch_size=500)
    tokens = reads_tokens(record)
    for name in ("packed.onnx", "float.onnx"):
        worst, differ, total = agreement(model, files[name], loader, tokens)
        what = "next characters" if tokens else "classes"
        print(f"{name}: max |Δlogit| {worst:.2e}; {differ} of {total:,} predicted {what} differ")


if __name__ == "__main__":
    main()
