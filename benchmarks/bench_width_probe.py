"""The width probe's cold start: each round's seconds of its candidate steps in a new process.

    python benchmarks/bench_width_probe.py [--data-dir ../shared/data] [--rounds 9]
        [--order wide|narrow] [--threads 2]

Builds the steps the preset `speedrun-binary` times before training (`width_fit`: widths 1,
0.75 and 0.5 at the preset's precision, `amp = "auto"` resolved for this CPU, on the first
training batch) and prints each round's seconds per width, then what the probe reads from
them: the median of five after two warm-up rounds (`interleaved`, qtrain's rule) beside the
median of three after one (its earlier rule) and the median of the last four rounds, which
stands for the warm speed. `--order narrow` times the narrowest first, to see whether the
cold start belongs to the first step timed or to the widest. Run it alone on the machine,
once per process: the cold start is what it measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import DEFAULT_DATA_DIR, cifar10_folder, machine_line  # noqa: E402

from qtrain.train import interleaved, width_fit  # noqa: E402
from qtrain.train.config import RunConfig, load_toml  # noqa: E402
from qtrain.train.devices import resolve_amp  # noqa: E402
from qtrain.train.distributed import DistributedContext  # noqa: E402
from qtrain.train.parts import load_splits, make_loaders  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--order", choices=("wide", "narrow"), default="wide")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.rounds < interleaved.WARMUP_ROUNDS + interleaved.REPEATS:
        parser.error(f"--rounds must be at least {interleaved.WARMUP_ROUNDS + interleaved.REPEATS}")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        folder, source = cifar10_folder(args.data_dir, Path(scratch))
        values = {**load_toml("speedrun-binary"), "data_dir": str(folder), "device": "cpu",
                  "val_images": 0, "threads": args.threads}  # fmt: skip
        config = resolve_amp(RunConfig(**values), device)
        splits, held_out = load_splits(config)
        train, _, _ = make_loaders(config, splits, held_out, device, DistributedContext.single())
        batch = next(iter(train.epoch(0)))
        widths = width_fit.candidate_widths(config.width)
        if args.order == "narrow":
            widths = widths[::-1]
        steps = width_fit.candidate_steps(config, splits, batch, widths, device)
        print(f"{source}; {machine_line()}; amp={config.amp}; batch {config.batch_size}")
        seconds = [[] for _ in widths]
        for round_index in range(args.rounds):
            for k, step in enumerate(steps):
                started = time.perf_counter()
                step()
                seconds[k].append(time.perf_counter() - started)
            row = "  ".join(f"{w:g}: {s[-1]:.3f}" for w, s in zip(widths, seconds, strict=True))
            print(f"round {round_index}  {row}")
    skip, count = interleaved.WARMUP_ROUNDS, interleaved.REPEATS
    print(
        f"\nseconds a step        median of {count} after {skip}   median of 3 after 1   "
        "median of the last 4"
    )
    for width, times in zip(widths, seconds, strict=True):
        now = statistics.median(times[skip : skip + count])
        before = statistics.median(times[1:4])
        warm = statistics.median(times[-4:])
        print(
            f"width {width:<5g}           {now:>8.3f} ({now / warm:.2f}×)     "
            f"{before:>8.3f} ({before / warm:.2f}×)     {warm:>8.3f}"
        )


if __name__ == "__main__":
    main()
