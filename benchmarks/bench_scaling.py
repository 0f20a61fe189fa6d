"""Scaling: qtrain's time per epoch against data set size and network width.

    python benchmarks/bench_scaling.py [--data-dir ../shared/data] [--widths 0.25 0.5 1.0]
        [--sizes 256 512 1024] [--batch 128] [--amp bf16] [--rounds 3] [--threads N]

For every width w and data set size N (random CIFAR-10 training subsets) a BC-ADAM VGG-9
`Trainer` runs one epoch of its loop (data, step, binarisation; no evaluation). Work is
N·F(w), with F(w) the training FLOP per image counted by `torch.utils.flop_counter`. All
(w, N) cells are timed round-robin, medians reported.

Linear growth in N is checked per width by a least-squares fit t(N) = a + b·N: a is the fixed
cost per epoch, b the cost per image, and the largest relative residual says how far from a
straight line the times are. Across widths, b / F(w) (seconds per image per GFLOP) compares
the cost per unit of work: equal values mean time grows in proportion to FLOP.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_flops import step_flops_per_image
from speed_common import (
    DEFAULT_DATA_DIR,
    cifar10_folder,
    interleave,
    machine_line,
    median,
    qtrain_trainer,
    train_round,
)


def linear_fit(sizes: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """(a, b, largest |residual| / t) of the least-squares line t = a + b·N."""
    n, t = np.asarray(sizes, dtype=float), np.asarray(seconds)
    b, a = np.polyfit(n, t, 1)
    return a, b, float(np.max(np.abs(t - (a + b * n)) / t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--amp", default="bf16", choices=("off", "bf16"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root, source = cifar10_folder(args.data_dir, Path(scratch))
        variants, flops = {}, {}
        for width in args.widths:
            for size in args.sizes:
                trainer = qtrain_trainer(
                    root,
                    Path(scratch) / f"{width}-{size}",
                    size,
                    width=width,
                    batch_size=args.batch,
                    amp=args.amp,
                    threads=args.threads,
                )
                flops.setdefault(width, step_flops_per_image(trainer))
                variants[(width, size)] = lambda r, t=trainer: train_round(t, r)
        times = interleave(variants, args.rounds)

    print(
        f"VGG-9 BC-ADAM, batch {args.batch}, amp={args.amp}, {source}; {args.rounds} "
        f"interleaved rounds; {machine_line()}"
    )
    print("seconds per epoch (median)")
    print(f"{'width':>6s} {'GFLOP/img':>10s} " + " ".join(f"{f'N={n}':>9s}" for n in args.sizes))
    for width in args.widths:
        cells = " ".join(f"{median(times[(width, n)]):9.2f}" for n in args.sizes)
        print(f"{width:6.2f} {flops[width] / 1e9:10.3f} {cells}")
    print("linear fit t = a + b*N per width")
    print(
        f"{'width':>6s} {'a (s)':>8s} {'b (ms/img)':>11s} {'max resid':>10s} {'s/img/GFLOP':>12s}"
    )
    for width in args.widths:
        a, b, residual = linear_fit(args.sizes, [median(times[(width, n)]) for n in args.sizes])
        per_work = b / (flops[width] / 1e9)
        print(f"{width:6.2f} {a:8.3f} {b * 1e3:11.2f} {100 * residual:9.1f}% {per_work:12.5f}")
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
