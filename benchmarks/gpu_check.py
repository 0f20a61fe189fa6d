"""GPU check: VGG-9 BC-ADAM on CIFAR-10 with bf16 autocast, channels_last and torch.compile.

    python benchmarks/gpu_check.py [--data-dir ../shared/data] [--epochs 3] [--width 1.0]
        [--batch 128] [--no-compile] [--fused-quant auto] [--device cuda] [--smoke]

(`benchmarks/gpu_check.sh` runs the CUDA tests first, then this.)

1. Peak: the device's dense bf16 matrix-product rate, measured here: 2·n³ FLOP per n×n
   product (n = 8192 on a GPU), timed between device synchronisations.
2. Training: `qtrain.train.Trainer.run` for --epochs epochs of the full recipe (train,
   evaluate on the test split, checkpoint, every epoch) with amp=bf16, channels_last and
   compile=True. The first epoch includes compilation; later epochs are the steady state.
3. Report: wall seconds per epoch, training images/s, achieved training TFLOP/s (FLOP per
   image counted by `torch.utils.flop_counter`: convolutions and matrix products) as a
   fraction of the measured bf16 peak, and the projected time of a 160-epoch run:
   first epoch + 159 steady epochs, against the 5-minute target.

Without CIFAR-10 under --data-dir the run trains on random images of CIFAR-10's shape and
count (50,000 + 10,000, written in the official format): every speed figure holds, the test
error means nothing, and the report says so.

--smoke runs the same code on a tiny model and synthetic 8×8 images, so the script itself can
be tested on any device (`--device cpu`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import cifar10_folder  # noqa: E402

from qtrain import models
from qtrain.train.config import RunConfig
from qtrain.train.devices import resolve_device
from qtrain.train.trainer import Trainer

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_IMAGES_PER_FILE = 10_000
FULL_RUN_EPOCHS = 160
TARGET_SECONDS = 300.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_matmul_peak(device: torch.device, n: int, repeats: int = 20) -> float:
    """Best-of-three FLOP/s of `repeats` bf16 n×n matrix products on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b  # warm-up: cuBLAS handle and heuristics
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def flops_per_image(config: RunConfig, num_classes: int, in_channels: int, side: int) -> float:
    """Training FLOP per image (forward + backward) of the config's model, counted on CPU."""
    model = models.create(
        config.model, num_classes=num_classes, width=config.width, in_channels=in_channels
    )
    x = torch.randn(2, in_channels, side, side)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(2, dtype=torch.long)).backward()
    return counter.get_total_flops() / 2


def run_config(args, data_dir: Path) -> RunConfig:
    base = dict(
        model="vgg9",
        width=args.width,
        dataset="cifar10",
        data_dir=str(data_dir),
        method="bc-adam",
        epochs=args.epochs,
        batch_size=args.batch,
        amp="bf16",
        channels_last=True,
        compile=args.compile,
        fused_quant=args.fused_quant,
        device=args.device,
    )
    if args.smoke:
        base.update(model="tiny_cnn", dataset="synthetic", data_dir=None, batch_size=64)
        base.update(eval_batch_size=128)
    return RunConfig(**base)


def timed_run(config: RunConfig, run_dir: Path) -> tuple[Trainer, list[dict], list[float]]:
    """Train; returns the trainer, per-epoch metrics and wall seconds of every epoch (between
    the epochs' record lines: the log's other lines, progress lines among them, are not
    stamped)."""

    def stamp(line: str, *args, **kwargs) -> None:
        if line.startswith("epoch "):
            stamps.append(time.perf_counter())

    trainer = Trainer(config, run_dir, log=stamp)
    stamps = [time.perf_counter()]
    metrics = trainer.run()
    walls = [after - before for before, after in zip(stamps, stamps[1:])]
    return trainer, metrics, walls


def report(args, device, peak, metrics, walls, flops, source: str) -> None:
    steady = walls[1:] or walls
    epoch_wall = statistics.median(steady)
    rate = statistics.median(m["images_per_second"] for m in metrics[1:] or metrics)
    achieved = rate * flops
    projected = walls[0] + (FULL_RUN_EPOCHS - 1) * epoch_wall
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; torch {torch.__version__}; compile={args.compile}; "
        f"fused_quant={args.fused_quant}"
    )
    if args.smoke:
        print("smoke run: tiny model on synthetic 8x8 images, not the VGG-9 figures")
    else:
        print(f"data: {source}")
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    print(f"training FLOP per image (counted): {flops / 1e9:.3f} G")
    print(f"epoch wall seconds (train + eval + checkpoint): {[round(w, 2) for w in walls]}")
    print(f"first epoch (with compilation) {walls[0]:.1f} s, steady epoch {epoch_wall:.2f} s")
    print(f"training images/s (steady) {rate:,.0f}")
    print(
        f"achieved {achieved / 1e12:.2f} TFLOP/s = {100 * achieved / peak:.1f}% of the "
        f"measured bf16 peak"
    )
    verdict = "meets" if projected <= TARGET_SECONDS else "misses"
    print(
        f"projected {FULL_RUN_EPOCHS}-epoch run: {projected:.0f} s ({projected / 60:.1f} min), "
        f"{verdict} the {TARGET_SECONDS / 60:.0f}-minute target"
    )
    print(f"final test error after {len(metrics)} epochs: {metrics[-1]['test_error']:.2f}%")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fused-quant", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--smoke", action="store_true", help="tiny model and synthetic data")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "gpu_check: torch sees no CUDA GPU (torch.cuda.is_available() is False); run it on "
            "a machine with a CUDA GPU and a CUDA build of torch, or test the script with "
            "--device cpu --smoke"
        )
    device = resolve_device(args.device)
    peak = bf16_matmul_peak(device, 512 if args.smoke else 8192)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir, source = args.data_dir, "synthetic"
        if not args.smoke:
            data_dir, source = cifar10_folder(
                args.data_dir, Path(scratch) / "data", CIFAR10_IMAGES_PER_FILE
            )
        config = run_config(args, data_dir)
        trainer, metrics, walls = timed_run(config, Path(scratch) / "run")
    splits = trainer.splits
    flops = flops_per_image(config, splits.num_classes, splits.in_channels, splits.image_size)
    report(args, device, peak, metrics, walls, flops, source)


if __name__ == "__main__":
    main()
