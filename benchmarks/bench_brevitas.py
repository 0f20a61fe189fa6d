"""Against Brevitas: binary-weight VGG-9 images/s, qtrain BC-ADAM vs `brevitas.nn.QuantConv2d`.

    pip install --no-deps brevitas dependencies==2.0.1 unfoldNd   # keeps the installed torch
    python benchmarks/bench_brevitas.py [--data-dir ../shared/data] [--width 0.5] [--batch 128]
        [--chunk 4] [--rounds 7] [--threads N] [--device cpu]

Both train the same VGG-9 with binary weights ±1 on the convolutions (linear layers and
BatchNorm in float) with Adam, on the same CIFAR-10 batches (qtrain's `BatchLoader`: one
seed, batched crop + flip, channels_last), so the ratio measures the quantized training
machinery alone:

- qtrain: BC-ADAM through `qtrain.train.Trainer`'s epoch loop; the model holds w_b = sign(w_r)
  as plain float tensors and the optimizer re-binarises its flat latent buffer once per step;
- Brevitas: every conv is `QuantConv2d(weight_quant=SignedBinaryWeightPerTensorConst,
  weight_scaling_const=1.0)` (latent float weights, binarised with a straight-through
  estimator inside each forward), trained by `torch.optim.Adam` in a plain loop;
- float: the unquantized network in the same plain loop, the reference for the overhead of
  quantized training over float training.

Each runs in float32 and under bf16 autocast. Rounds of --chunk batches alternate between
variants; medians give images/s. Without brevitas installed the benchmark says so and stops.
With --device cuda the same comparison runs on a GPU (each round ends with a synchronisation).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from speed_common import (
    DEFAULT_DATA_DIR,
    cifar10_folder,
    interleave,
    machine_line,
    median,
    qtrain_trainer,
    train_round,
)
from torch import nn
from torch.nn import functional as F

from qtrain import models
from qtrain.train.devices import autocast_context


def binarise_convs_with_brevitas(model: nn.Module) -> nn.Module:
    """Replace every nn.Conv2d by a Brevitas binary-weight QuantConv2d with the same weights."""
    import brevitas.nn as qnn
    from brevitas.quant.binary import SignedBinaryWeightPerTensorConst

    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d):
            quant = qnn.QuantConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                bias=child.bias is not None,
                weight_quant=SignedBinaryWeightPerTensorConst,
                weight_scaling_const=1.0,  # levels ±1, as qtrain's binary grid with Δ = 1
            )
            with torch.no_grad():
                quant.weight.copy_(child.weight)
            setattr(model, name, quant)
        else:
            binarise_convs_with_brevitas(child)
    return model


def plain_loop(trainer, width: float, amp: str, brevitas: bool):
    """Adam over a fresh VGG-9 fed the trainer's batches; returns run(round_index)."""
    torch.manual_seed(0)
    model = models.create("vgg9", num_classes=10, width=width, in_channels=3)
    if brevitas:
        model = binarise_convs_with_brevitas(model)
    device = trainer.device
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def run(r: int) -> None:
        for x, y in trainer.train_loader.epoch(r):
            with autocast_context(device, amp):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=4, help="batches per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        import brevitas
    except ImportError:
        print(
            "brevitas is not installed, so there is nothing to compare against; install it "
            "without touching torch: pip install --no-deps brevitas dependencies==2.0.1 unfoldNd"
        )
        sys.exit(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root, source = cifar10_folder(args.data_dir, Path(scratch))
        images = args.chunk * args.batch
        common = dict(width=args.width, batch_size=args.batch, threads=args.threads)
        common["device"] = args.device
        variants = {}
        for amp in ("off", "bf16"):
            trainer = qtrain_trainer(root, Path(scratch) / amp, images, amp=amp, **common)
            suffix = "" if amp == "off" else ", bf16"
            variants[f"qtrain BC-ADAM{suffix}"] = lambda r, t=trainer: train_round(t, r)
            variants[f"Brevitas QuantConv2d{suffix}"] = plain_loop(trainer, args.width, amp, True)
            variants[f"float Adam{suffix}"] = plain_loop(trainer, args.width, amp, False)
        times = interleave(variants, args.rounds)

    print(
        f"VGG-9 width {args.width}, batch {args.batch}, {source}; brevitas "
        f"{brevitas.__version__}; {args.rounds} interleaved rounds of {args.chunk} batches; "
        f"{machine_line()}"
    )
    print(f"{'variant':30s} {'images/s':>9s} {'vs float':>9s}")
    for name, ts in times.items():
        float_name = "float Adam" + (", bf16" if name.endswith("bf16") else "")
        t = median(ts)
        print(f"{name:30s} {images / t:9.1f} {median(times[float_name]) / t:8.2f}x")
    for suffix in ("", ", bf16"):
        ratio = median(times[f"Brevitas QuantConv2d{suffix}"]) / median(
            times[f"qtrain BC-ADAM{suffix}"]
        )
        print(f"ratio qtrain / Brevitas{suffix or ', float32'}: {ratio:.2f}x")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
