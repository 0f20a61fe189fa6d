"""Shared by the speed benchmarks: CIFAR-10 or a stand-in, the qtrain trainer, timing.

- `cifar10_folder`: the real CIFAR-10 when ``--data-dir`` holds it, else synthetic images of
  the same shape written in the official format, so every benchmark runs the same code path.
- `qtrain_trainer`: the library's `Trainer` over a fixed random subset of the training split;
  `train_round` runs one epoch of it, i.e. the trainer's own loop, not a copy of it.
- `interleave`: times the variants round-robin, so drift in the machine's speed (other jobs
  on a shared host) hits every variant alike; benchmarks report medians and their ratios.
"""

from __future__ import annotations

import os
import pickle
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qtrain.train.config import RunConfig
from qtrain.train.state import TrainState
from qtrain.train.trainer import Trainer

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
# A benchmark's rounds are epochs of one trainer (`train_round`): its run must have one for
# every round, the warm-up's included.
ROUNDS_MAX = 1000


def write_synthetic_cifar10(root: Path, images_per_file: int = 2000, seed: int = 0) -> Path:
    """Random uint8 images [N, 3, 32, 32] in CIFAR-10's python format under root."""
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in (*CIFAR10_TRAIN_FILES, "test_batch"):
        batch = {
            b"data": rng.integers(0, 256, (images_per_file, 3 * 32 * 32), dtype=np.uint8),
            b"labels": rng.integers(0, 10, images_per_file).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    names = {b"label_names": [f"class{k}".encode() for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(names, protocol=4))
    return root


def cifar10_folder(data_dir: Path, scratch: Path, images_per_file: int = 2000) -> tuple[Path, str]:
    """(folder holding cifar-10-batches-py, description): data_dir, else synthetic in scratch
    (``images_per_file`` = 10,000 gives the real set's sizes: 50,000 + 10,000 images)."""
    if (data_dir / CIFAR10_FOLDER / "data_batch_1").is_file():
        return data_dir, f"CIFAR-10 from {data_dir}"
    return (
        write_synthetic_cifar10(scratch, images_per_file),
        "synthetic 32x32 images (CIFAR-10 not found): speed figures only",
    )


def qtrain_trainer(root: Path, run_dir: Path, images: int, **config) -> Trainer:
    """A `Trainer` for VGG-9 on `images` random CIFAR-10 training images (one epoch = a round)."""
    base = dict(
        model="vgg9",
        dataset="cifar10",
        data_dir=str(root),
        train_subset=images,
        method="bc-adam",
        epochs=ROUNDS_MAX,
        device="cpu",
    )
    return Trainer(RunConfig(**{**base, **config}), run_dir, log=lambda *a: None, progress=False)


def train_round(trainer: Trainer, epoch: int) -> None:
    """One epoch of the trainer's own loop (`Trainer._train_epoch`), without evaluation.

    An epoch past the run's last trains nothing (its length is 0 steps), so a round index at
    or past `trainer.epochs` is refused rather than timed as an empty loop."""
    if epoch >= trainer.epochs:
        raise ValueError(
            f"round {epoch} is past the trainer's {trainer.epochs} epochs and would train "
            "nothing; build the trainer with more epochs"
        )
    trainer._train_epoch(TrainState(epoch=epoch))


def finish_queued_work() -> None:
    """Wait for the GPU's queued kernels, so that a clock read next counts them (a no-op on a
    CPU, and on a machine whose process has not touched CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed_call(run: Callable[[int], None], r: int) -> float:
    """Seconds of ``run(r)``, the GPU's kernels it queued included."""
    finish_queued_work()
    start = time.perf_counter()
    run(r)
    finish_queued_work()
    return time.perf_counter() - start


def interleave(variants: dict[str, Callable[[int], None]], rounds: int) -> dict[str, list]:
    """Seconds per call of each variant (called with the round index), round-robin.

    One untimed warm-up call each first: memory, oneDNN primitives, worker processes.
    """
    for run in variants.values():
        run(rounds)
    times: dict[str, list] = {name: [] for name in variants}
    for r in range(rounds):
        for name, run in variants.items():
            times[name].append(timed_call(run, r))
    return times


class StepClock:
    """Seconds spent inside an optimizer's `step()` per round, read by its step hooks (host
    time: on the CPU the work itself; on a GPU only the time to queue it). `lap()` ends a
    round; `laps` holds one total per round, in order.

    A subclass whose `step` calls `super().step()` fires the hooks again inside the outer
    call (torch wraps each class's `step` that has had an instance); only the outermost
    call is timed."""

    def __init__(self, optimizer: torch.optim.Optimizer, clock=time.perf_counter) -> None:
        self.laps: list[float] = []
        self._clock = clock
        self._spent = 0.0
        self._started = 0.0
        self._depth = 0
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_) -> None:
        if self._depth == 0:
            self._started = self._clock()
        self._depth += 1

    def _post(self, *_) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._spent += self._clock() - self._started

    def lap(self) -> None:
        self.laps.append(self._spent)
        self._spent = 0.0


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: list[float], base: list[float]) -> float:
    """The median over rounds of a variant's seconds ÷ `base`'s in the same round (`interleave`
    runs each round's variants one after another). A slow spell of a shared machine that lasts
    a round scales both, so the ratio moves less than that of the two medians."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def machine_line() -> str:
    """Threads, load average (1, 5, 15 min), torch version and CPU vector capability."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{torch.get_num_threads()} threads, load average {load} on {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"
    )
