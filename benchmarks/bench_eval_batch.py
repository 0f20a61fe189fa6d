"""What an evaluation costs against its minibatch: the speedrun's one-view test pass.

    python benchmarks/bench_eval_batch.py [--data-dir ../shared/data] [--batches 1000,250,128,64]
        [--width 1.0] [--images 5000] [--rounds 3] [--threads 2] [--amp auto]

The preset `speedrun-binary`'s model (untrained: the cost does not depend on the weights),
channels-last, evaluated by the trainer's own `evaluate` (one view, no TTA) over `images` test
images of CIFAR-10 (random images when --data-dir holds none), once per evaluation batch size,
rounds interleaved (`speed_common.interleave`). Printed per batch size: images/s and time ÷
time at the largest batch. On a CPU a smaller batch keeps its activations in cache; this is
the measurement behind `eval_batch_size`'s default. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import DEFAULT_DATA_DIR, cifar10_folder, interleave, machine_line, median  # noqa: E402

from qtrain import data as qdata  # noqa: E402
from qtrain import models  # noqa: E402
from qtrain.data.arrays import ArrayDataset  # noqa: E402
from qtrain.train.config import RunConfig, load_toml  # noqa: E402
from qtrain.train.devices import resolve_amp  # noqa: E402
from qtrain.train.evaluation import evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--batches", default="1000,250,128,64")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=5000, help="test images a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="auto", help="auto, bf16 or off")
    args = parser.parse_args()
    try:
        batches = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
    except ValueError:
        parser.error(f"--batches takes whole numbers separated by commas, got {args.batches!r}")
    if batches[-1] < 1:
        parser.error(f"every batch size must be at least 1, got {batches[-1]}")
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    config = RunConfig(**{**load_toml("speedrun-binary"), "width": args.width, "amp": args.amp})
    amp = resolve_amp(config, cpu).amp
    with tempfile.TemporaryDirectory() as scratch:
        folder, source = cifar10_folder(args.data_dir, Path(scratch))
        splits = qdata.load("cifar10", str(folder), download=False)
    test = splits.test
    n = min(args.images, len(test.labels))
    splits = dataclasses.replace(splits, test=ArrayDataset(test.images[:n], test.labels[:n]))
    model = models.create("speednet", num_classes=10, width=args.width, in_channels=3)
    model = model.to(memory_format=torch.channels_last)
    loaders = {b: splits.loader("test", b, seed=0, channels_last=True) for b in batches}
    rounds = {b: (lambda _r, loader=loader: evaluate(model, loader, cpu, amp))
              for b, loader in loaders.items()}  # fmt: skip
    times = interleave(rounds, args.rounds)
    print(f"speednet ×{args.width:g}, amp {amp}, {n} test images a round, {source}; "
          f"{args.rounds} interleaved rounds; {machine_line()}")  # fmt: skip
    reference = median(times[batches[0]])
    print(f"{'batch':>5s} {'images/s':>9s} {f'time ÷ {batches[0]}':>12s}")
    for b in batches:
        middle = median(times[b])
        print(f"{b:5d} {n / middle:9.1f} {middle / reference:12.3f}")


if __name__ == "__main__":
    main()
