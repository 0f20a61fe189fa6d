"""Augmented CIFAR-10 images per second: `BatchLoader` vs a standard per-sample DataLoader.

Both produce the same thing per batch: a 4-pixel zero-padded random 32×32 crop, a random
horizontal flip and per-channel normalisation, as float32 [B, 3, 32, 32] with int64 labels.

- BatchLoader: the split is one uint8 tensor; each batch is gathered, cropped, flipped and
  normalised with a few batched tensor ops in the main process.
- BatchLoader with airbench's crop and flip (the speedrun preset's: a 2-pixel crop into the
  image's reflection, alternating flips), timed in alternation with the first so that the
  ratio of the two is read from one run.
- DataLoader: the usual recipe, a map-style Dataset applying the transforms image by image
  (written in torch, as torchvision's RandomCrop(32, padding=4), RandomHorizontalFlip and
  Normalize would do them) with ``--workers`` worker processes and default collation.

Run:  python benchmarks/bench_data.py [--root DIR] [--batch-size 128] [--workers 2] [--threads N]
      (median of three alternating passes for the two BatchLoader rows)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import qtrain.data as data
from qtrain.data.augment import Augmentation

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


class PerSampleCifar(Dataset):
    """CIFAR images transformed one at a time: pad-4 random crop, flip, to [0, 1], normalise."""

    def __init__(self, split: data.ArrayDataset, mean, std, padding: int = 4) -> None:
        self.images = split.images
        self.labels = split.labels
        self.mean = torch.tensor(mean).view(3, 1, 1) / 255
        self.std = torch.tensor(std).view(3, 1, 1) / 255
        self.padding = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]  # uint8 [3, 32, 32]
        padded = F.pad(image, (self.padding,) * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = padded[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return (image.float() / 255 - self.mean) / self.std, self.labels[index]


def rate_of(batches, limit: int) -> float:
    """Images per second over ``limit`` batches, after one warm-up batch (worker start-up)."""
    iterator = iter(batches)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _, (x, _) in zip(range(limit), iterator, strict=False):
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder with CIFAR-10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batches", type=int, default=200, help="timed batches per loader")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = data.load("cifar10", root=args.root)
    fast = splits.loader("train", args.batch_size, seed=0)  # a BatchLoader, the usual crop
    airbench = splits.loader(
        "train",
        args.batch_size,
        seed=0,
        augmentation=Augmentation(padding=2, fill="reflect", flip="alternating"),
    )
    standard = DataLoader(
        PerSampleCifar(splits.train, splits.mean, splits.std),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    limit = min(args.batches, len(fast) - 1)
    rounds = [(rate_of(fast.epoch(r), limit), rate_of(airbench.epoch(r), limit)) for r in range(3)]
    fast_rate, airbench_rate = (sorted(rates)[1] for rates in zip(*rounds, strict=True))  # medians
    standard_rate = rate_of(standard, limit)

    threads = torch.get_num_threads()
    print(f"CIFAR-10 train, batch {args.batch_size}, {limit} timed batches each, {threads} threads")
    print(f"{'loader':<54}{'images/s':>12}")
    print(f"{'BatchLoader (batched tensor ops)':<54}{fast_rate:>12,.0f}")
    print(f"{'BatchLoader, 2-pixel reflected crop, alternating flip':<54}{airbench_rate:>12,.0f}")
    label = f"DataLoader (per-sample, {args.workers} workers)"
    print(f"{label:<54}{standard_rate:>12,.0f}")
    print(f"ratio BatchLoader / DataLoader: {fast_rate / standard_rate:.1f}x")
    print(f"time of airbench's crop and flip / the usual: {fast_rate / airbench_rate:.3f}")


if __name__ == "__main__":
    main()
