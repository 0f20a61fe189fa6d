"""End to end: qtrain BC-ADAM images/s against the PyTorch CIFAR tutorial's float Adam loop.

    python benchmarks/bench_end_to_end.py [--data-dir ../shared/data] [--width 0.5]
        [--batch 128] [--chunk 4] [--rounds 7] [--workers 2] [--threads N] [--compile]
        [--breakdown]

The same VGG-9 (width --width) trains on CIFAR-10 batches of --batch images:

- tutorial: what users write by hand after the PyTorch CIFAR-10 tutorial — a map-style
  Dataset applying torchvision-style per-sample transforms (4-pixel pad + random 32×32 crop,
  horizontal flip, to [0, 1], normalise; torch ops, see bench_data.PerSampleCifar), a
  DataLoader with --workers worker processes, NCHW tensors, float weights, torch.optim.Adam,
  `loss.item()` per step for the running loss;
- qtrain: BC-ADAM (binary weights) through `qtrain.train.Trainer`'s own epoch loop with its
  defaults (in-memory batched augmentation, channels_last), once as is (float32 activations)
  and once with ``amp="bf16"`` (bf16 autocast; binary weights ±1 are exact in bf16);
- with --compile also qtrain with bf16 and ``compile=True`` (the compile time is printed);
- with --breakdown also the tutorial's float Adam step on ready-made batches (no DataLoader),
  once NCHW and once channels_last: what the data pipeline and the memory layout each cost.

A round is one pass of each variant over --chunk batches (its own random subset of the
training split, the same size for all); rounds alternate between variants and the median
round time gives images/s. The ratio qtrain / tutorial is the figure of merit.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_data import PerSampleCifar
from speed_common import (
    DEFAULT_DATA_DIR,
    cifar10_folder,
    interleave,
    machine_line,
    median,
    qtrain_trainer,
    train_round,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader, SubsetRandomSampler

import qtrain.data as qdata
from qtrain import models


def tutorial_round(args, splits: qdata.DataSplits):
    """The hand-written loop over a persistent DataLoader; returns run(round_index)."""
    torch.manual_seed(0)
    model = models.create("vgg9", num_classes=10, width=args.width, in_channels=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    subset = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        PerSampleCifar(splits.train, splits.mean, splits.std),
        batch_size=args.batch,
        sampler=SubsetRandomSampler(subset[: args.chunk * args.batch].tolist()),
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )

    def run(_round: int) -> None:
        running_loss = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()

    return run


def ready_batches_round(args, trainer, channels_last: bool):
    """The tutorial's float Adam step on batches made once in advance; returns run(round)."""
    torch.manual_seed(0)
    model = models.create("vgg9", num_classes=10, width=args.width, in_channels=3)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(x.contiguous(memory_format=layout), y) for x, y in trainer.train_loader.epoch(0)]

    def run(_round: int) -> None:
        for x, y in batches:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
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
    parser.add_argument("--workers", type=int, default=2, help="tutorial DataLoader workers")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="add qtrain with compile=True")
    parser.add_argument("--breakdown", action="store_true", help="add ready-batch float loops")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root, source = cifar10_folder(args.data_dir, Path(scratch))
        splits = qdata.load("cifar10", root)
        images = args.chunk * args.batch
        common = dict(width=args.width, batch_size=args.batch, threads=args.threads)

        def qtrain_variant(name: str, **config):
            trainer = qtrain_trainer(root, Path(scratch) / name, images, **common, **config)
            return lambda r: train_round(trainer, r)

        def ready_variants() -> dict:
            trainer = qtrain_trainer(root, Path(scratch) / "ready", images, **common)
            return {
                "FP Adam, ready batches, NCHW": ready_batches_round(args, trainer, False),
                "FP Adam, ready batches, channels_last": ready_batches_round(args, trainer, True),
            }

        variants = {
            "tutorial: DataLoader + NCHW + FP Adam": tutorial_round(args, splits),
            "qtrain BC-ADAM (defaults)": qtrain_variant("fp32", amp="off"),
            "qtrain BC-ADAM, amp=bf16": qtrain_variant("bf16", amp="bf16"),
        }
        compile_note = ""
        if args.compile:
            compiled = qtrain_variant("compiled", amp="bf16", compile=True)
            start = time.perf_counter()
            compiled(args.rounds + 1)  # compiles forward and backward
            compile_note = f"; compiling took {time.perf_counter() - start:.0f} s"
            variants["qtrain BC-ADAM, amp=bf16, compile"] = compiled
        if args.breakdown:
            variants.update(ready_variants())
        times = interleave(variants, args.rounds)

    print(
        f"VGG-9 width {args.width}, batch {args.batch}, {source}; {args.rounds} interleaved "
        f"rounds of {args.chunk} batches; {machine_line()}{compile_note}"
    )
    tutorial = median(times["tutorial: DataLoader + NCHW + FP Adam"])
    print(f"{'variant':40s} {'images/s':>9s} {'vs tutorial':>12s}")
    for name, ts in times.items():
        t = median(ts)
        print(f"{name:40s} {images / t:9.1f} {tutorial / t:11.2f}x")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
