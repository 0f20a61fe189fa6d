"""Data sets and loaders: one registry for CIFAR-10/100, the embedded digits, synthetic images
ImageNet folders and
character-level text (tiny Shakespeare or any UTF-8 file).

`load(name, ...)` builds any registered set as its `Splits` (a "train" and a "test" split plus
``num_classes``, ``in_channels``, ``image_size``), and ``splits.loader(split, batch_size, ...)``
gives batches through one protocol (`Loader`: ``len`` and ``epoch(e, start_batch)``).
`dataset_info(name)` tells a set's shape before any file is read.
"""

from __future__ import annotations

from qtrain.base.errors import MissingDependencyError

from .arrays import SPLITS, ArrayDataset, DataSplits
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
from .registry import (
    DATA_ENV,
    DatasetInfo,
    Loader,
    Splits,
    dataset_info,
    default_root,
    list_datasets,
    load,
    register_dataset,
    subset_train,
)
from .synthetic import make_synthetic
from .text import TextLoader, TextSplits, load_text, read_text

__all__ = [
    "DATA_ENV",
    "SPLITS",
    "ArrayDataset",
    "BatchLoader",
    "ChecksumError",
    "CorruptDataError",
    "DataError",
    "DataSplits",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DownloadError",
    "ImageNetLoader",
    "ImageNetSplits",
    "Loader",
    "MissingDependencyError",
    "Splits",
    "UnsafePickleError",
    "dataset_info",
    "default_root",
    "list_datasets",
    "load",
    "load_imagenet",
    "make_synthetic",
    "register_dataset",
    "subset_train",
    "TextLoader",
    "TextSplits",
    "load_text",
    "read_text",
]
