"""The data set registry: every data set qtrain trains on, selectable by name.

An entry knows what its images look like before any file is read (channels, side, classes),
so names and the fit of a model can be checked before data is touched, and how to build its
splits. Whatever an entry builds has the same shape (`Splits`): a "train" and a "test" split,
``num_classes``, ``in_channels``, ``image_size`` and ``loader(split, batch_size, ...)``, whose
loaders share one protocol (`Loader`). A data set added later registers one more entry.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

from .cifar import load_cifar
from .digits import load_digits
from .holdout import sample_images
from .imagenet import load_imagenet
from .loader import Batch
from .synthetic import make_synthetic
from .text import SHAKESPEARE_FOLDER, load_shakespeare

DATA_ENV = "QTRAIN_DATA"


class Loader(Protocol):
    """What the trainer sees of any data set's batches."""

    batch_size: int

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch`` … len−1 of ``epoch``: x float32 [B, C, H, W], y int64 [B]."""


class Splits(Protocol):
    """What every data set builds: two splits, their shape and a loader per split."""

    train: object
    test: object
    num_classes: int
    in_channels: int
    image_size: int
    name: str

    def loader(self, split: str, batch_size: int, **options) -> Loader:
        """A `Loader` of "train" or "test" (see `DataSplits.loader`)."""


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: its shape before any file is read, and how to build it.

    ``image_size`` None means the images are made at whatever side the model takes (synthetic
    images are generated at it, ImageNet photos are cropped to it). ``folder`` is the
    subfolder of `default_root` that holds the set when no root is given.
    ``build(root, download, **options)`` returns its `Splits`. ``modality`` is "image" (x
    float [B, C, H, W], y [B]) or "text" (x, y int64 token ids [B, T], `qtrain.data.text`).
    ``examples`` is (train, test): what the built splits hold in memory, images or the tokens
    of a text set's own text; None when they are read from disk a batch at a time (ImageNet).
    """

    name: str
    description: str
    in_channels: int
    image_size: int | None
    num_classes: int | None
    build: Callable[..., Splits]
    options: tuple[str, ...] = ()
    folder: str = ""
    modality: str = "image"
    examples: tuple[int, int] | None = None


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add ``info`` to the registry; a duplicate name is a programming error."""
    if info.name in _DATASETS:
        raise UserError(f"data set name {info.name!r} is already registered; pick another name")
    _DATASETS[info.name] = info
    return info


def list_datasets(modality: str | None = None) -> list[str]:
    """Names accepted by `load`, sorted; only those holding `modality` when given."""
    return sorted(n for n in _DATASETS if modality is None or _DATASETS[n].modality == modality)


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry of ``name``; an unknown name is a ValueError with a suggestion."""
    if name not in _DATASETS:
        raise unknown_name("data set", name, list_datasets())
    return _DATASETS[name]


def default_root() -> Path:
    """Where downloaded data sets live: ``$QTRAIN_DATA``, else ``~/.cache/qtrain``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "qtrain").expanduser()


def load(name: str, root: str | Path | None = None, download: bool = False, **options) -> Splits:
    """Build data set ``name`` (see `list_datasets`) as its `Splits`.

    ``root`` (default `default_root`, or its ``imagenet`` subfolder for ImageNet) is the
    folder holding the files; ``download`` lets CIFAR be fetched when missing. ``options`` go
    to the builder: ``url``/``md5`` for a CIFAR download, ``image_size`` for the sets made at
    the model's size, the parameters of `make_synthetic` for ``synthetic``.
    """
    info = dataset_info(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        accepted = ", ".join(info.options) or "none"
        raise UserError(
            f"data set {name!r} has no option {', '.join(unknown)}; its options are: {accepted}"
        )
    root = default_root() / info.folder if root is None else Path(root).expanduser()
    return info.build(root, download, **options)


def subset_train(splits: Splits, size: int | None, seed: int) -> Splits:
    """``splits`` with only ``size`` training images, drawn by the run's "subset" stream.

    keep = the first ``size`` entries of a permutation of the training indices drawn from
    `stream_generator(seed, "subset")`; with ``size`` None or ≥ the split, nothing changes.
    """
    if size is None or size >= len(splits.train):
        return splits
    return replace(splits, train=sample_images(splits, size, seed, "subset"))


def _cifar(name: str) -> Callable[..., Splits]:
    return lambda root, download, **options: load_cifar(name, root, download, **options)


_SYNTHETIC = inspect.signature(make_synthetic).parameters

for _info in (
    DatasetInfo("cifar10", "CIFAR-10: 50,000 + 10,000 colour images, 32×32, 10 classes",
                3, 32, 10, _cifar("cifar10"), ("url", "md5"), examples=(50_000, 10_000)),
    DatasetInfo("cifar100", "CIFAR-100: 50,000 + 10,000 colour images, 32×32, 100 classes",
                3, 32, 100, _cifar("cifar100"), ("url", "md5"), examples=(50_000, 10_000)),
    DatasetInfo("digits", "handwritten digits (scikit-learn): 1,497 + 300 images, 8×8, gray",
                1, 8, 10, lambda root, download: load_digits(), examples=(1_497, 300)),
    DatasetInfo("synthetic", "random class prototypes plus noise, made at the model's size",
                3, None, 4, lambda root, download, **options: make_synthetic(**options),
                tuple(_SYNTHETIC), examples=(_SYNTHETIC["num_train"].default,
                                             _SYNTHETIC["num_test"].default)),
    DatasetInfo("imagenet", "ImageNet folders root/train and root/val, cropped to the model",
                3, None, None, lambda root, download, **options: load_imagenet(root, **options),
                ("image_size",), folder="imagenet"),
    DatasetInfo("shakespeare-char", "tiny Shakespeare by character: 1,003,854 + 111,540 "
                "tokens, 65 symbols (or any UTF-8 text_file; model hf may read it with its "
                "tokenizer)", 1, None, 65, load_shakespeare,
                ("block_size", "text_file", "tokenizer", "max_vocab", "url", "sha256"),
                folder=SHAKESPEARE_FOLDER,
                modality="text", examples=(1_003_854, 111_540)),
):  # fmt: skip
    register_dataset(_info)
