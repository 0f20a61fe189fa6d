"""CIFAR reading: the real files, a fake folder or archive, and every kind of bad input."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import qtrain.data as data
from qtrain.data.cifar import CIFAR10, CIFAR100, CifarSpec, read_batch

PER_FILE = 20  # images per fake batch file: two of each CIFAR-10 class


def write_pickle(path: Path, content) -> None:
    path.write_bytes(pickle.dumps(content, protocol=4))


def fake_batch(spec: CifarSpec, count: int, seed: int) -> dict:
    """A batch dict shaped like the official ones (bytes keys, uint8 [N, 3072], int labels)."""
    rng = np.random.default_rng(seed)
    labels = [i % spec.num_classes for i in range(count)]
    return {
        b"batch_label": b"fake batch",
        spec.label_key.encode(): labels,
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"{i:05d}.png".encode() for i in range(count)],
    }


def write_fake_cifar(root: Path, spec: CifarSpec = CIFAR10, per_file: int = PER_FILE) -> Path:
    """An extracted fake ``spec.folder`` in ``root`` with official names and layout."""
    folder = root / spec.folder
    folder.mkdir(parents=True)
    for seed, name in enumerate((*spec.train_files, *spec.test_files)):
        write_pickle(folder / name, fake_batch(spec, per_file, seed))
    names = [f"class{k}".encode() for k in range(spec.num_classes)]
    write_pickle(folder / spec.meta_file, {spec.names_key.encode(): names})
    return folder


def write_archive(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def test_real_cifar10_has_the_known_counts_and_statistics(cifar10_root):
    splits = data.load("cifar10", root=cifar10_root)
    assert splits.train.images.shape == (50_000, 3, 32, 32)
    assert splits.test.images.shape == (10_000, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.labels.bincount().tolist() == [5000] * 10
    assert splits.test.labels.bincount().tolist() == [1000] * 10
    assert splits.mean == pytest.approx((125.31, 122.95, 113.87), abs=0.01)
    assert [s / 255 for s in splits.std] == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-4)
    assert splits.class_names[:3] == ["airplane", "automobile", "bird"]
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (10, 3, 32)
    assert splits.augment and splits.name == "cifar10"
    # Values known from the official files: labels, and row 0 in R…G…B plane order.
    assert splits.train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert splits.test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    row0 = splits.train.images[0].reshape(-1)
    assert row0[:3].tolist() == [59, 43, 50] and row0[-3:].tolist() == [140, 84, 72]


@pytest.mark.parametrize("spec", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_fake_folder_reads_back_exactly(tmp_path, spec):
    folder = write_fake_cifar(tmp_path, spec)
    splits = data.load(spec.name, root=tmp_path)
    n_train = PER_FILE * len(spec.train_files)
    assert len(splits.train) == n_train and len(splits.test) == PER_FILE
    first = fake_batch(spec, PER_FILE, 0)
    expected = torch.from_numpy(first[b"data"].reshape(-1, 3, 32, 32))
    assert torch.equal(splits.train.images[:PER_FILE], expected)
    assert splits.train.labels[:PER_FILE].tolist() == first[spec.label_key.encode()]
    assert splits.num_classes == spec.num_classes and len(splits.class_names) == spec.num_classes
    assert folder.is_dir()


def test_archive_in_root_is_extracted_once_and_read(tmp_path):
    source = tmp_path / "source"
    folder = write_fake_cifar(source)
    root = tmp_path / "root"
    root.mkdir()
    write_archive(folder, root / CIFAR10.archive)
    from_archive = data.load("cifar10", root=root)
    assert (root / CIFAR10.folder).is_dir()
    assert sorted(p.name for p in root.iterdir()) == sorted([CIFAR10.archive, CIFAR10.folder])
    direct = data.load("cifar10", root=source)
    assert torch.equal(from_archive.train.images, direct.train.images)


def test_missing_folder_says_where_to_put_the_archive(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load("cifar10", root=tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar-10-python.tar.gz" in message and "download=True" in message
    assert str(tmp_path / "nowhere") in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_batch_file_is_named(tmp_path):
    folder = write_fake_cifar(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(data.DatasetNotFoundError, match="data_batch_3"):
        data.load("cifar10", root=tmp_path)


def corrupt(folder: Path, how: str) -> None:
    path = folder / "data_batch_2"
    good = fake_batch(CIFAR10, PER_FILE, 1)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong shape":
        write_pickle(path, {**good, b"data": good[b"data"][:, :3000]})
    elif how == "wrong dtype":
        write_pickle(path, {**good, b"data": good[b"data"].astype(np.float32)})
    elif how == "object array":
        write_pickle(path, {**good, b"data": good[b"data"].astype(object)})
    elif how == "label out of range":
        write_pickle(path, {**good, b"labels": [10] + good[b"labels"][1:]})
    elif how == "negative label":
        write_pickle(path, {**good, b"labels": [-1] + good[b"labels"][1:]})
    elif how == "label count":
        write_pickle(path, {**good, b"labels": good[b"labels"][:-1]})
    elif how == "labels not ints":
        write_pickle(path, {**good, b"labels": ["cat"] * PER_FILE})
    elif how == "missing key":
        write_pickle(path, {k: v for k, v in good.items() if k != b"data"})
    elif how == "not a dict":
        write_pickle(path, [1, 2, 3])


CORRUPTIONS = {
    "truncated": "truncated or corrupt",
    "garbage": "truncated or corrupt",
    "empty": "truncated or corrupt",
    "wrong shape": "shape",
    "wrong dtype": "shape",
    "object array": "shape",
    "label out of range": r"outside 0\.\.9",
    "negative label": r"outside 0\.\.9",
    "label count": "one per image",
    "labels not ints": "one per image",
    "missing key": "lacks the key 'data'",
    "not a dict": "not the dict",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_bad_batch_file_is_a_clear_error(tmp_path, how):
    folder = write_fake_cifar(tmp_path)
    corrupt(folder, how)
    with pytest.raises(data.CorruptDataError, match=CORRUPTIONS[how]) as info:
        data.load("cifar10", root=tmp_path)
    message = str(info.value)
    assert "data_batch_2" in message and "download" in message
    assert isinstance(info.value, ValueError)


class Payload:
    """Pickles as a call of ``function(*args)``: what a crafted file uses to run code."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(
    "function,args",
    [
        (io.open, "MARKER"),
        (os.system, "touch MARKER"),
        (subprocess.call, ["touch", "MARKER"]),
        (eval, "open('MARKER', 'w')"),
        (np.load, "MARKER"),
    ],
    ids=["open", "os.system", "subprocess", "eval", "numpy.load"],
)
def test_crafted_pickle_is_refused_without_running_code(tmp_path, monkeypatch, function, args):
    monkeypatch.chdir(tmp_path)
    folder = write_fake_cifar(tmp_path / "root")
    good = fake_batch(CIFAR10, PER_FILE, 0)
    write_pickle(folder / "data_batch_1", {**good, b"data": Payload(function, args)})
    with pytest.raises(data.UnsafePickleError, match="official CIFAR files never contain"):
        data.load("cifar10", root=tmp_path / "root")
    assert not (tmp_path / "MARKER").exists()


def test_real_files_reference_only_allowed_globals(cifar10_root):
    images, labels = read_batch(cifar10_root / CIFAR10.folder / "test_batch", CIFAR10)
    assert images.shape == (10_000, 3, 32, 32) and labels.max() == 9


def unsafe_archive(path: Path, member: tarfile.TarInfo, payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


@pytest.mark.parametrize(
    "name,kind",
    [
        ("cifar-10-batches-py/../../escaped", tarfile.REGTYPE),
        ("/tmp/absolute-escape", tarfile.REGTYPE),
        ("cifar-10-batches-py/link", tarfile.SYMTYPE),
        ("elsewhere/data_batch_1", tarfile.REGTYPE),
    ],
    ids=["dotdot", "absolute", "symlink", "outside-folder"],
)
def test_unsafe_archive_members_are_refused(tmp_path, name, kind):
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = 1 if kind == tarfile.REGTYPE else 0
    member.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
    root = tmp_path / "root"
    root.mkdir()
    unsafe_archive(root / CIFAR10.archive, member)
    with pytest.raises(data.CorruptDataError, match="not a plain file inside"):
        data.load("cifar10", root=root)
    assert sorted(p.name for p in root.iterdir()) == [CIFAR10.archive]
    assert not (tmp_path / "escaped").exists()


def test_truncated_archive_is_refused_and_cleaned_up(tmp_path):
    folder = write_fake_cifar(tmp_path / "source")
    root = tmp_path / "root"
    root.mkdir()
    archive = write_archive(folder, root / CIFAR10.archive)
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(data.CorruptDataError, match="truncated or corrupt"):
        data.load("cifar10", root=root)
    assert sorted(p.name for p in root.iterdir()) == [CIFAR10.archive]
