"""Against the machine: training FLOP/s of qtrain's step as a fraction of peak conv FLOP/s.

    python benchmarks/bench_flops.py [--data-dir ../shared/data] [--width 1.0] [--batch 128]
        [--chunk 2] [--rounds 5] [--threads N] [--profile]

Peak: the best FLOP/s of a 3×3 convolution forward (channels_last, the library's layout)
over the three VGG-9 layer shapes at width 1 and batch --batch — 64→64 on 32×32, 128→128 on
16×16, 256→256 on 8×8 — measured here in float32 and in bf16. A 3×3 convolution does
2·B·H·W·C_in·C_out·9 FLOP.

Step: BC-ADAM on VGG-9 through `qtrain.train.Trainer`'s epoch loop (data, forward, backward,
optimizer, binarisation: everything), in float32 and with ``amp="bf16"``. Its FLOP per image
are counted by `torch.utils.flop_counter` over one forward + backward (convolutions and
matrix products; the elementwise rest is not counted, so the fraction is a lower bound).

Peak and step measurements alternate round by round; medians are reported, and each step
variant is divided by the peak of its own dtype. --profile adds torch.profiler's table of
the operators that take the time in one bf16 step.
"""

from __future__ import annotations

import argparse
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
from torch.utils.flop_counter import FlopCounterMode

from qtrain.train.devices import autocast_context

CONV_SHAPES = ((64, 32), (128, 16), (256, 8))  # (channels, side) of VGG-9's conv stages
REPEATS = 3  # convolution calls per timed peak measurement


def conv_peak(batch: int, dtype: torch.dtype):
    """run(round) timing REPEATS forwards of each VGG-9 conv shape; returns (run, flops)."""
    cases = []
    for channels, side in CONV_SHAPES:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dtype)
        conv = conv.to(memory_format=torch.channels_last).requires_grad_(False)
        x = torch.randn(batch, channels, side, side, dtype=dtype)
        cases.append((conv, x.contiguous(memory_format=torch.channels_last)))
    flops = [2 * batch * side * side * channels * channels * 9 for channels, side in CONV_SHAPES]
    best = [[] for _ in cases]

    def run(_round: int) -> None:
        for (conv, x), seconds in zip(cases, best):
            start = time.perf_counter()
            for _ in range(REPEATS):
                conv(x)
            seconds.append((time.perf_counter() - start) / REPEATS)

    def peak() -> tuple[float, int]:
        """(best median FLOP/s, index of the shape that reached it)."""
        rates = [f / median(s) for f, s in zip(flops, best)]
        return max(rates), rates.index(max(rates))

    return run, peak


def step_flops_per_image(trainer) -> float:
    """FLOP of one forward + backward per image (convolutions and matrix products)."""
    x, y = next(iter(trainer.train_loader.epoch(0)))
    with FlopCounterMode(display=False) as counter:
        with autocast_context(trainer.device, trainer.config.amp):
            loss = F.cross_entropy(trainer.model(x).float(), y)
        loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def profile_step(trainer) -> None:
    """torch.profiler table (self CPU time) of one step of the trainer's loop."""
    from torch.profiler import ProfilerActivity, profile

    train_round(trainer, 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_round(trainer, 1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(f"profile of {len(trainer.train_loader)} bf16 steps, top operators by self CPU time:")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=2, help="batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    images = args.chunk * args.batch
    dtypes = {"off": torch.float32, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as scratch:
        root, source = cifar10_folder(args.data_dir, Path(scratch))
        common = dict(width=args.width, batch_size=args.batch, threads=args.threads)
        trainers, peaks, variants = {}, {}, {}
        for amp, dtype in dtypes.items():
            trainers[amp] = qtrain_trainer(root, Path(scratch) / amp, images, amp=amp, **common)
            run, peaks[amp] = conv_peak(args.batch, dtype)
            variants[f"peak conv {dtype}"] = run
            variants[f"step {amp}"] = lambda r, t=trainers[amp]: train_round(t, r)
        flops = {amp: step_flops_per_image(t) for amp, t in trainers.items()}
        times = interleave(variants, args.rounds)
        if args.profile:
            profile_step(trainers["bf16"])

    print(
        f"VGG-9 width {args.width} BC-ADAM, batch {args.batch}, {source}; {args.rounds} "
        f"interleaved rounds of {args.chunk} steps; {machine_line()}"
    )
    print(f"counted training FLOP per image: {flops['off'] / 1e9:.3f} G")
    print(
        f"{'dtype':9s} {'peak conv GFLOP/s':>18s} {'at shape':>10s} {'step GFLOP/s':>13s}"
        f" {'images/s':>9s} {'of peak':>8s}"
    )
    for amp, dtype in dtypes.items():
        peak, best = peaks[amp]()
        channels, side = CONV_SHAPES[best]
        rate = images / median(times[f"step {amp}"])
        achieved = rate * flops[amp]
        print(
            f"{str(dtype)[6:]:9s} {peak / 1e9:18.1f} {f'{channels}@{side}x{side}':>10s} "
            f"{achieved / 1e9:13.1f} {rate:9.1f} {100 * achieved / peak:7.1f}%"
        )
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
