"""Step time of BC-ADAM, SR-ADAM and R-ADAM against FP-ADAM on one VGG network and batch.

    python benchmarks/bench_methods.py [--model vgg9] [--width 0.5] [--batch 128] [--rounds 15]

The four methods train identical copies of the network on the same batch. Steps are timed
round-robin (FP, BC, SR, R, FP, BC, …) so that any drift of the machine's speed hits every
method alike; the median step time of each method is compared with FP-ADAM's and printed as
the overhead in percent. The quantization work itself (rounding, clipping, flip counting) is
also timed alone, as a fraction of the FP step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from qtrain import methods, models

METHODS = ("fp-adam", "bc-adam", "sr-adam", "r-adam")


def make_step(method: str, args, x, y):
    torch.manual_seed(0)
    model = models.create(args.model, num_classes=10, width=args.width)
    model = model.to(memory_format=torch.channels_last)
    opt = methods.create(method, model, lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vgg9")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, 10, (args.batch,), generator=g)
    steps = {m: make_step(m, args, x, y) for m in METHODS}
    for step, _ in steps.values():  # warm-up: allocator, oneDNN primitives, Adam state
        step()
        step()
    times = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m, (step, _) in steps.items():
            start = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - start)
    fp = statistics.median(times["fp-adam"])
    print(
        f"{args.model} width {args.width} batch {args.batch}, {torch.get_num_threads()} threads,"
        f" {args.rounds} interleaved rounds, median step time"
    )
    print(f"{'method':8s} {'ms/step':>9s} {'vs FP-ADAM':>11s}")
    for m in METHODS:
        t = statistics.median(times[m])
        print(f"{m:8s} {t * 1e3:9.1f} {100 * (t / fp - 1):+10.1f}%")
    for m in ("bc-adam", "sr-adam", "r-adam"):
        opt = steps[m][1]
        flat = opt._buffers.get("latent", opt._flat_wb)
        start = time.perf_counter()
        for _ in range(20):
            opt._round(flat, stochastic=opt.mode == "sr")
        rounding = (time.perf_counter() - start) / 20
        print(
            f"{m}: rounding {opt.num_quantized:,} weights takes {rounding * 1e3:.2f} ms "
            f"= {100 * rounding / fp:.2f}% of the FP step"
        )


if __name__ == "__main__":
    main()
