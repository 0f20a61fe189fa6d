"""What a training step of the speedrun recipe costs at a smaller image side, against its FLOPs.

    python benchmarks/bench_resize.py [--data-dir ../shared/data] [--sides 16,20,24,28,32]
        [--images 2560] [--rounds 5] [--threads 2] [--amp auto]

For each side s, the trainer's own loop (`Trainer._train_epoch`) over `images` CIFAR-10
training images of the preset `speedrun-binary` with progressive resizing starting at s (so
its first epoch, the round timed here, trains at side s; s = 32 is the preset unchanged).
Rounds are interleaved (`speed_common.interleave`). Printed per side: images/s, time ÷ time
at 32, and FLOP ÷ FLOP at 32 (`qtrain.train.flops`). Where the time ratio is above the FLOP
ratio, a small map runs at a lower FLOP rate than a large one, and the time-budget fit of a
resized run (which prices later, larger epochs by FLOPs) errs towards fewer steps. Run it
alone on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import DEFAULT_DATA_DIR, cifar10_folder, interleave, machine_line, median  # noqa: E402

from qtrain.train.config import RunConfig, load_toml  # noqa: E402
from qtrain.train.flops import training_flop_per_image  # noqa: E402
from qtrain.train.state import TrainState  # noqa: E402
from qtrain.train.trainer import Trainer  # noqa: E402

FULL_SIDE = 32


def preset_at(side: int, folder: Path, run_dir: Path, args) -> Trainer:
    """The preset on `args.images` images whose first epoch trains at `side`."""
    values = {**load_toml("speedrun-binary"), "data_dir": str(folder), "device": "cpu",
              "train_subset": args.images, "val_images": 0, "epochs": 2, "amp": args.amp,
              "threads": args.threads, "time_budget_s": None, "fit_to_budget": False,
              "resize_min_side": side if side < FULL_SIDE else None}  # fmt: skip
    return Trainer(RunConfig(**values), run_dir, log=lambda *a, **k: None, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--sides", default="16,20,24,28,32")
    parser.add_argument("--images", type=int, default=2560, help="training images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--amp", default="auto", help="auto, bf16 or off")
    args = parser.parse_args()
    sides = sorted({int(s) for s in args.sides.split(",")} | {FULL_SIDE})
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder, source = cifar10_folder(args.data_dir, scratch)
        trainers = {s: preset_at(s, folder, scratch / str(s), args) for s in sides}
        rounds = {s: (lambda _r, t=t: t._train_epoch(TrainState(epoch=0)))
                  for s, t in trainers.items()}  # fmt: skip
        times = interleave(rounds, args.rounds)
        amp = trainers[FULL_SIDE].config.amp
    flops = {s: training_flop_per_image(trainers[s].config, s) for s in sides}
    print(f"speedrun-binary, amp {amp}, {args.images} images a round, {source}; "
          f"{args.rounds} interleaved rounds; {machine_line()}")  # fmt: skip
    reference = median(times[FULL_SIDE])
    print(f"{'side':>4s} {'images/s':>9s} {'time ÷ 32':>10s} {'FLOP ÷ 32':>10s}")
    for s in sides:
        middle = median(times[s])
        print(f"{s:4d} {args.images / middle:9.1f} {middle / reference:10.3f} "
              f"{flops[s] / flops[FULL_SIDE]:10.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
