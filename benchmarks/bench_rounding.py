"""Stochastic rounding Q_s: elements/s of the fused kernel against the memory-bandwidth bound.

    python benchmarks/bench_rounding.py [--numel 67108864] [--grid binary] [--rounds 7]
                                        [--threads N]

Q_s reads each float32 weight once and writes its rounded value once: 8 bytes per element,
exactly what `dst.copy_(src)` moves. The copy's elements/s is therefore the bound no rounding
kernel can beat, and every variant is reported as a fraction of it:

- copy: `dst.copy_(w)` into a preallocated tensor (the bound);
- torch.rand: the uniforms alone, the generator cost inside the naive kernel;
- naive: `qtrain.quant.round_stochastic` (torch.rand + compare, several eager passes);
- fused: `round_stochastic_hashed` (counter-based hash + rounding, one compiled loop), once
  returning a new tensor and once writing into a preallocated `out` (as the copy does).

Variants run round-robin, so drift in the machine's speed hits all alike; medians are
printed. Before timing, the fused result is checked bit for bit against the eager
evaluation of the same formulas on the first million elements.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from qtrain.quant import parse_grid, round_stochastic
from qtrain.quant.fast_rounding import round_stochastic_hashed

BYTES_PER_ELEMENT = 8  # one float32 read, one float32 write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--grid", default="binary")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = parse_grid(args.grid)
    g = torch.Generator().manual_seed(0)
    # weights one small step away from the grid, as after an SR step
    w = grid.hi * (torch.rand(args.numel, generator=g) * 2 - 1)
    dst, out = torch.empty_like(w), torch.empty_like(w)

    start = time.perf_counter()
    check = w[: 2**20]
    fused = round_stochastic_hashed(check, grid, torch.Generator().manual_seed(1))
    compile_s = time.perf_counter() - start
    eager = round_stochastic_hashed(check, grid, torch.Generator().manual_seed(1), fused=False)
    identical = torch.equal(fused, eager)

    variants = {
        "copy (bound)": lambda: dst.copy_(w),
        "torch.rand alone": lambda: torch.rand(w.shape, generator=g),
        "naive Q_s (torch.rand + compare)": lambda: round_stochastic(w, grid, g),
        "fused Q_s, new tensor": lambda: round_stochastic_hashed(w, grid, g),
        "fused Q_s, into out": lambda: round_stochastic_hashed(w, grid, g, out=out),
    }
    for run in variants.values():  # warm-up: page in buffers, size the fused kernel
        run()
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    bound = args.numel / statistics.median(times["copy (bound)"])
    print(
        f"Q_s on {args.numel:,} float32 weights, grid {grid.describe()}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
        f"{args.rounds} interleaved rounds, medians"
    )
    print(
        f"fused kernel: first call (compile) {compile_s:.1f} s; "
        f"bit-identical to the eager formulas: {identical}"
    )
    print(f"{'variant':36s} {'ms':>8s} {'Gelem/s':>8s} {'GB/s':>7s} {'of bound':>9s}")
    for name, ts in times.items():
        t = statistics.median(ts)
        rate = args.numel / t
        print(
            f"{name:36s} {t * 1e3:8.1f} {rate / 1e9:8.3f} "
            f"{rate * BYTES_PER_ELEMENT / 1e9:7.1f} {100 * rate / bound:8.1f}%"
        )
    naive = statistics.median(times["naive Q_s (torch.rand + compare)"])
    fast = statistics.median(times["fused Q_s, into out"])
    print(f"ratio fused / naive: {naive / fast:.1f}x")


if __name__ == "__main__":
    main()
