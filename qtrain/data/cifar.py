"""CIFAR-10 / CIFAR-100 from the official python archives, read without executing code.

The official batches are protocol-2 pickles (written by Python 2) of a dict with ``data``, a
uint8 numpy array [N, 3072] whose rows hold 1024 red, then 1024 green, then 1024 blue values
of a 32×32 image in row-major order, and the labels as a list of ints. Unpickling goes through
`RestrictedUnpickler`, which resolves only the three numpy globals those files contain, so a
crafted file cannot run code. Every file is then checked for keys, dtype, shape and label range.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtrain.base.folder_lock import FolderLock

from .arrays import ArrayDataset, DataSplits, channel_stats
from .download import download_and_extract, extract_archive
from .errors import CorruptDataError, DatasetNotFoundError, UnsafePickleError

SIDE = 32
ROW_LENGTH = 3 * SIDE * SIDE


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant lives and how its files are laid out."""

    name: str
    title: str
    url: str
    md5: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def url_env(self) -> str:
        """Environment variable that overrides the download URL (e.g. for a mirror)."""
        return f"QTRAIN_{self.name.upper()}_URL"


CIFAR10 = CifarSpec(
    name="cifar10",
    title="CIFAR-10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    archive="cifar-10-python.tar.gz",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)

CIFAR100 = CifarSpec(
    name="cifar100",
    title="CIFAR-100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    archive="cifar-100-python.tar.gz",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)

SPECS = {spec.name: spec for spec in (CIFAR10, CIFAR100)}


def _reconstruct():
    # numpy 2 moved numpy.core to numpy._core; both spellings name the same function.
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")._reconstruct


# (module, name) → object, for exactly the globals the official CIFAR pickles reference.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array reconstruction; any other global is refused."""

    def find_class(self, module: str, name: str):
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(
                f"refers to {module}.{name}, which official CIFAR files never contain"
            )
        return resolve()

    def persistent_load(self, pid):
        raise UnsafePickleError("uses persistent ids, which official CIFAR files never contain")


# What a truncated or garbled pickle raises part-way through loading.
UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    MemoryError,
    OverflowError,
)


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def unpickle(path: Path) -> dict[str, object]:
    """Load one CIFAR pickle with `RestrictedUnpickler`; keys come back as ``str``."""
    fix = "delete the folder and extract or download the official archive again"
    try:
        with open(path, "rb") as file:
            # encoding="bytes" keeps Python-2 strings as bytes; array payloads stay raw.
            content = RestrictedUnpickler(file, encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path} {error}; it was not loaded, {fix}") from None
    except UNPICKLE_ERRORS as error:
        raise CorruptDataError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); {fix}"
        ) from None
    if not isinstance(content, dict):
        raise CorruptDataError(
            f"{path} holds a {type(content).__name__}, not the dict of a CIFAR batch; {fix}"
        )
    return {_text(key): value for key, value in content.items()}


def _field(content: dict, key: str, path: Path):
    if key not in content:
        raise CorruptDataError(
            f"{path} lacks the key {key!r} of a CIFAR batch (it has {sorted(content)}); "
            "delete the folder and extract or download the official archive again"
        )
    return content[key]


def _is_image_rows(data) -> bool:
    return (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[0] > 0
        and data.shape[1] == ROW_LENGTH
    )


def read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one batch file, validated."""
    fix = "delete the folder and extract or download the official archive again"
    content = unpickle(path)
    data = _field(content, "data", path)
    if not _is_image_rows(data):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise CorruptDataError(
            f"{path} has data of shape {shape} and type {dtype}, expected uint8 "
            f"[N, {ROW_LENGTH}]; {fix}"
        )
    raw_labels = _field(content, spec.label_key, path)
    try:
        labels = np.asarray(raw_labels)
        labels_ok = labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
    except (TypeError, ValueError):
        labels_ok = False
    # numpy reads True among ints as 1; no official file holds a bool
    if isinstance(raw_labels, list) and any(isinstance(v, (bool, np.bool_)) for v in raw_labels):
        labels_ok = False
    if not labels_ok or labels.shape[0] != data.shape[0]:
        raise CorruptDataError(
            f"{path} has {spec.label_key} that are not {data.shape[0]} integers (one per "
            f"image); {fix}"
        )
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise CorruptDataError(
            f"{path} has labels from {labels.min()} to {labels.max()}, outside "
            f"0..{spec.num_classes - 1} of {spec.title}; {fix}"
        )
    return data.reshape(-1, 3, SIDE, SIDE), labels.astype(np.int64)


def read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> ArrayDataset:
    """Concatenate the batch files of one split into an `ArrayDataset`."""
    parts = [read_batch(folder / name, spec) for name in files]
    images = np.concatenate([images for images, _ in parts])
    labels = np.concatenate([labels for _, labels in parts])
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels))


def read_class_names(folder: Path, spec: CifarSpec) -> list[str]:
    """Class names in label order from the meta file."""
    path = folder / spec.meta_file
    names = _field(unpickle(path), spec.names_key, path)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise CorruptDataError(
            f"{path} does not list {spec.num_classes} class names under {spec.names_key!r}; "
            "delete the folder and extract or download the official archive again"
        )
    return [_text(name) for name in names]


def read_cifar(folder: Path, spec: CifarSpec) -> DataSplits:
    """Read an extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder."""
    missing = [
        name
        for name in (*spec.train_files, *spec.test_files, spec.meta_file)
        if not (folder / name).is_file()
    ]
    if missing:
        raise DatasetNotFoundError(
            f"{folder} lacks {', '.join(missing)}; delete the folder and extract or download "
            f"{spec.archive} again"
        )
    train = read_split(folder, spec.train_files, spec)
    test = read_split(folder, spec.test_files, spec)
    mean, std = channel_stats(train.images)
    return DataSplits(
        train=train,
        test=test,
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=SIDE,
        mean=mean,
        std=std,
        augment=True,
        name=spec.name,
        class_names=read_class_names(folder, spec),
    )


def load_cifar(
    name: str,
    root: Path,
    download: bool = False,
    url: str | None = None,
    md5: str | None = None,
) -> DataSplits:
    """Read CIFAR ``name`` from ``root``: the extracted folder, else the archive, else download.

    ``url`` (default: the environment variable ``QTRAIN_CIFAR10_URL`` / ``QTRAIN_CIFAR100_URL``,
    else the official address) and ``md5`` (default: the official archive's) apply to a
    download only. An archive found in ``root`` is extracted next to it once.
    """
    spec = SPECS[name]
    root = Path(root).expanduser()
    folder = root / spec.folder
    if not folder.is_dir():
        archive = root / spec.archive
        if not archive.is_file() and not download:
            raise DatasetNotFoundError(
                f"{spec.title} was not found in {root}: put {spec.archive} (from {spec.url}) "
                f"or its extracted folder {spec.folder} there, or fetch it with {{download}}",
                download="download=True",
            )
        # Processes that find the folder missing at once (the workers of `--jobs N`) take
        # turns: the first extracts or downloads it, the others then find it in place.
        with FolderLock(root, wait=True):
            if archive.is_file() and not folder.is_dir():
                extract_archive(archive, root, spec.folder)
            elif not folder.is_dir():
                download_and_extract(
                    url or os.environ.get(spec.url_env) or spec.url,
                    md5 or spec.md5,
                    root,
                    spec.archive,
                    spec.folder,
                )
    return read_cifar(folder, spec)
