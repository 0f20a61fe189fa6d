"""Data sets and loaders: CIFAR-10/100, the embedded digits, synthetic images, ImageNet.

`load` returns `DataSplits` (both splits as uint8 tensors plus their statistics) and
`BatchLoader` turns a split into normalised, augmented batches with batched tensor ops.
ImageNet folders are read by `load_imagenet` and batched by `ImageNetLoader` (needs Pillow).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from qtrain.base.errors import MissingDependencyError
from qtrain.base.names import unknown_name

from .arrays import ArrayDataset, DataSplits
from .cifar import load_cifar
from .digits import load_digits
from .errors import (
    ChecksumError,
    CorruptDataError,
    DataError,
    DatasetNotFoundError,
    DownloadError,
    UnsafePickleError,
)
from .imagenet import ImageNetLoader, ImageNetSplits, load_imagenet
from .loader import BatchLoader
from .synthetic import make_synthetic

DATA_ENV = "QTRAIN_DATA"

_BUILDERS = {
    "cifar10": lambda root, download, **options: load_cifar("cifar10", root, download, **options),
    "cifar100": lambda root, download, **options: load_cifar("cifar100", root, download, **options),
    "digits": lambda root, download, **options: load_digits(**options),
    "synthetic": lambda root, download, **options: make_synthetic(**options),
}
_OPTIONS = {
    "cifar10": ("url", "md5"),
    "cifar100": ("url", "md5"),
    "digits": (),
    "synthetic": tuple(inspect.signature(make_synthetic).parameters),
}


def list_datasets() -> list[str]:
    """Names accepted by `load`, sorted."""
    return sorted(_BUILDERS)


def default_root() -> Path:
    """Where downloaded data sets live: ``$QTRAIN_DATA``, else ``~/.cache/qtrain``."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / ".cache" / "qtrain").expanduser()


def load(
    name: str, root: str | Path | None = None, download: bool = False, **options
) -> DataSplits:
    """Load data set ``name`` (see `list_datasets`) as `DataSplits`.

    ``root`` (default `default_root`) is the folder holding the CIFAR files; ``download``
    lets CIFAR be fetched when missing. ``options`` go to the builder: ``url``/``md5`` for a
    CIFAR download, shape and size parameters of `make_synthetic` for ``synthetic``.
    """
    if name not in _BUILDERS:
        raise unknown_name("data set", name, list_datasets())
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        accepted = ", ".join(_OPTIONS[name]) or "none"
        raise ValueError(
            f"data set {name!r} has no option {', '.join(unknown)}; its options are: {accepted}"
        )
    root = default_root() if root is None else Path(root).expanduser()
    return _BUILDERS[name](root, download, **options)


__all__ = [
    "ArrayDataset",
    "BatchLoader",
    "ChecksumError",
    "CorruptDataError",
    "DataError",
    "DataSplits",
    "DatasetNotFoundError",
    "DownloadError",
    "ImageNetLoader",
    "ImageNetSplits",
    "MissingDependencyError",
    "UnsafePickleError",
    "default_root",
    "list_datasets",
    "load",
    "load_imagenet",
    "make_synthetic",
]
