"""Fast in-memory batches: the whole split lives on the device as one uint8 tensor.

Per batch, everything is a batched tensor op (no per-image Python):

    idx   = perm[b·B : (b+1)·B]                      indices of global batch b   [B]
    x     = images[idx]                              uint8                       [B, C, H, W]
    x     = crop_flip(x)  (qtrain.data.augment)      uint8                       [B, C, H, W]
    x     = (x − mean_c) / std_c                     float32                     [B, C, H, W]

The crop and the flip (`Augmentation`: a p-pixel padded random crop and a random or
alternating horizontal flip) are one `gather` over flat pixel indices.

Reproducibility: the shuffle of an epoch is a pure function of (seed, epoch) and the
augmentation of batch b a pure function of (seed, epoch, b), each drawn from its own CPU
`torch.Generator` (so batches are identical on every device). The two come from the run's
"data-order" and "augment" random streams (`qtrain.base.streams`): shuffle seed
mix(stream_seed(seed, "data-order"), epoch), augmentation seed
mix(stream_seed(seed, "augment"), epoch, b); an alternating flip's per-image first flips come
from the "flip" stream, once per run. Resuming an epoch at batch b
therefore yields exactly the batches an uninterrupted epoch would.

Threads: on a CPU device each batch is computed with one intra-op thread. The ops are
memory-bound and small (≈1.5 MB for 128 CIFAR images), so more threads gain nothing, while on
an oversubscribed CPU every parallel region can wait ~10 ms for a descheduled worker thread
(measured on 2 busy cores: 1,500 images/s with 2 threads, 110,000 with 1).

Sharding: with world size W the batch size B is global; rank r gets the contiguous slice
[r·B/W, (r+1)·B/W) of every global batch, and all ranks share the permutation and the
augmentation draws, so the union of the ranks' slices is the single-process batch.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from qtrain.base.errors import UserError
from qtrain.base.streams import stream_generator, stream_seed

from .augment import (
    USUAL_AUGMENTATION,
    Augmentation,
    alternating_flips,
    crop_flip,
    draw_augmentation,
)

if TYPE_CHECKING:  # arrays.py builds loaders, so the import runs one way only
    from .arrays import ArrayDataset

Batch = tuple[torch.Tensor, torch.Tensor]  # x float32 [B, C, H, W], y int64 [B]


@contextlib.contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the enclosed torch ops on the calling thread only; restores the thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts`` (BLAKE2b of them)."""
    data = b"".join(int(part).to_bytes(8, "little", signed=True) for part in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded with `mix_seed` of ``parts``."""
    return torch.Generator().manual_seed(mix_seed(*parts))


def epoch_permutation(size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of ``epoch``: a permutation of range(size), int64 [size] on the CPU."""
    return torch.randperm(size, generator=generator_for(stream_seed(seed, "data-order"), epoch))


def augmentation_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the augmentation draws of batch (or image) ``position`` of ``epoch``."""
    return mix_seed(stream_seed(seed, "augment"), epoch, position)


def rank_slice(size: int, rank: int, world_size: int) -> slice:
    """Contiguous part of a global batch of ``size`` for ``rank``.

    Equal parts when ``world_size`` divides ``size`` (always true for full training batches);
    a short last batch is split like `torch.tensor_split`, so some ranks may get fewer items.
    """
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class Batching(ABC):
    """What every loader shares: a global batch split over ranks, batches per epoch, a
    resumable ``epoch(e, start_batch)`` and the per-channel normalisation x = (pixel − mean)/std.

    A subclass yields the batches of one epoch from ``_batches(epoch, start_batch)``.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int,
        device: torch.device | str,
        drop_last: bool | None,
        channels_last: bool,
        rank: int,
        world_size: int,
    ) -> None:
        _check_sizes(size, batch_size, rank, world_size)
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise UserError(
                f"mean and std need {channels} values (one per channel) with std > 0, got "
                f"mean={tuple(mean)} std={tuple(std)}; pass the data set's statistics"
            )
        self.size = size
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and size < batch_size:
            raise UserError(
                f"batch size {batch_size} is larger than the {size} images of the "
                "split, so dropping the last partial batch leaves none; use a smaller batch"
            )
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        shape = (1, channels, 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        if self.drop_last:
            return self.size // self.batch_size
        return -(-self.size // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch`` … len−1 of ``epoch``: x float32 [B/W, C, H, W], y int64."""
        if not 0 <= start_batch <= len(self):
            raise UserError(
                f"start_batch {start_batch} is outside 0..{len(self)} (batches per epoch); "
                "resume from a batch index of this epoch"
            )
        return self._batches(epoch, start_batch)

    @abstractmethod
    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        """This rank's batches ``start_batch`` … len−1 of ``epoch``."""

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] on the device → float32 (pixel − mean)/std, in place."""
        x = pixels.float().sub_(self.mean).div_(self.std)  # in place: no extra [B, C, H, W]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class BatchLoader(Batching):
    """Iterates normalised float32 batches of an `ArrayDataset` stored on ``device``.

    ``batch_size`` is global (split across ``world_size`` ranks). ``mean`` and ``std`` are per
    channel in pixel units (0..255). With ``train`` the order is shuffled per epoch and, if
    ``augment``, images are cropped and flipped as ``augmentation`` says; without
    ``train`` the order is the dataset's and nothing is augmented. ``drop_last`` defaults to
    ``train``. Every rank yields the same number of batches; with ``drop_last`` false a rank's
    share of the short last batch may be empty.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: bool,
        seed: int,
        device: torch.device | str = "cpu",
        drop_last: bool | None = None,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augmentation: Augmentation = USUAL_AUGMENTATION,
    ) -> None:
        super().__init__(
            len(dataset),
            batch_size,
            channels=dataset.images.shape[1],
            mean=mean,
            std=std,
            train=train,
            seed=seed,
            device=device,
            drop_last=drop_last,
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
        )
        self.augment = train and augment
        self.augmentation = augmentation
        self.images = dataset.images.to(self.device)  # uint8 [N, C, H, W], stored once
        self.labels = dataset.labels.to(self.device)
        self.first_flips = None  # "alternating": each image's flip in even epochs, bool [N]
        if self.augment:
            augmentation.check_image(*self.images.shape[2:])
            if augmentation.flip == "alternating":
                draws = torch.rand(len(dataset), generator=stream_generator(seed, "flip"))
                self.first_flips = (draws < 0.5).to(self.device)

    @property
    def num_samples(self) -> int:
        """Images per epoch over all ranks."""
        return len(self) * self.batch_size if self.drop_last else self.images.shape[0]

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        size = self.images.shape[0]
        if self.train:
            order = epoch_permutation(size, self.seed, epoch).to(self.device)
        else:
            order = torch.arange(size, device=self.device)
        on_cpu = self.device.type == "cpu"
        for b in range(start_batch, len(self)):
            global_indices = order[b * self.batch_size : (b + 1) * self.batch_size]
            with one_intra_op_thread() if on_cpu else contextlib.nullcontext():
                batch = self._batch(global_indices, epoch, b)
            yield batch

    def _batch(self, global_indices: torch.Tensor, epoch: int, b: int) -> Batch:
        """This rank's part of global batch ``b``, given the batch's dataset indices [B]."""
        part = rank_slice(global_indices.shape[0], self.rank, self.world_size)
        indices = global_indices[part]
        x = self.images.index_select(0, indices)
        if self.augment:
            padding, fill = self.augmentation.padding, self.augmentation.fill
            generator = torch.Generator().manual_seed(augmentation_seed(self.seed, epoch, b))
            draws = draw_augmentation(global_indices.shape[0], padding, generator)
            dy, dx, flip = (d[part].to(self.device) for d in draws)
            if self.first_flips is not None:
                flip = alternating_flips(self.first_flips.index_select(0, indices), epoch)
            x = crop_flip(x, dy, dx, flip, padding, fill)
        return self.normalise(x), self.labels.index_select(0, indices)


def _check_sizes(size: int, batch_size: int, rank: int, world_size: int) -> None:
    if size == 0:
        raise UserError("the data set is empty; load a split that holds images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"rank {rank} is not in 0..{world_size - 1} for world size {world_size}; "
            "pass the process's rank and the number of processes"
        )
    if batch_size % world_size:
        raise UserError(
            f"global batch size {batch_size} is not divisible by world size {world_size}; "
            "choose a batch size that is a multiple of the number of processes"
        )
