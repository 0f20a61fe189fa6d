"""Fuzzed data: CIFAR batches, text files, ImageNet folders (the kinds are described in
fuzz_kinds.py)."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
from functools import cached_property
from pathlib import Path

import fuzz_mutations as fm
import numpy as np
import torch
from fuzz_harness import Verdict, call_reader, call_verdict, cli_verdict, run_cli, same_value
from fuzz_originals import (
    GPT,
    IMAGENET_CLASSES,
    TEXT,
    Originals,
    cifar_cli_args,
    imagenet_cli,
    imagenet_images,
    read_jsonl,
    without_timings,
)
from hypothesis import strategies as st

# -- CIFAR batches -----------------------------------------------------------------------------


class ReferenceUnpickler(pickle.Unpickler):
    """An independent restricted unpickler: numpy's array reconstruction only."""

    def find_class(self, module, name):
        if (module, name) in (("numpy.core.multiarray", "_reconstruct"),
                              ("numpy._core.multiarray", "_reconstruct")):  # fmt: skip
            return np._core.multiarray._reconstruct
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent id")


def reference_batch(data: bytes, meta: bool):
    """What a CIFAR-10 file says, checked against the official structure; None if it is not
    one: (images uint8 [N, 3, 32, 32], labels int64 [N]) of a batch, the names of meta."""
    try:
        content = ReferenceUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception:
        return None
    if not isinstance(content, dict):
        return None
    content = {k.decode("latin1") if isinstance(k, bytes) else str(k): v
               for k, v in content.items()}  # fmt: skip
    if meta:
        names = content.get("label_names")
        if not isinstance(names, list) or len(names) != 10:
            return None
        return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    images, labels = content.get("data"), content.get("labels")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[0] > 0 and images.shape[1] == 3072):  # fmt: skip
        return None
    if isinstance(labels, np.ndarray):
        values = labels.tolist() if labels.ndim == 1 and labels.dtype.kind in "iu" else None
    elif isinstance(labels, (list, tuple)):
        values = list(labels)
    else:
        values = None
    if (
        values is None
        or len(values) != images.shape[0]
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
        or not all(0 <= int(v) < 10 for v in values)
    ):
        return None
    return images.reshape(-1, 3, 32, 32), np.array([int(v) for v in values], dtype=np.int64)


def cifar_dict_mutations():
    """Edits of an unpickled batch: labels, data and keys at their edges."""
    label_values = st.sampled_from([-1, 10, 255, 2**31, 2**63, 2**64, 2**70, 1.5, "3", None,
                                    True, np.int64(3), np.uint8(9)])  # fmt: skip
    data_values = st.sampled_from(["uint16", "int8", "3071", "1-D", "empty", "list", "float"])
    return st.one_of(
        st.tuples(st.just("label"), st.integers(0, 19), label_values),
        st.tuples(
            st.just("labels"), st.sampled_from(["short", "long", "array", "2-D", "str"]), st.none()
        ),  # fmt: skip
        st.tuples(st.just("data"), data_values, st.none()),
        st.tuples(
            st.just("drop"), st.sampled_from([b"data", b"labels", b"batch_label"]), st.none()
        ),  # fmt: skip
        st.tuples(st.just("str key"), st.sampled_from([b"data", b"labels"]), st.none()),
    )


def edit_batch(content: dict, edit) -> dict:
    what, where, value = edit
    content = dict(content)
    labels = list(content[b"labels"])
    data = content[b"data"]
    if what == "label":
        labels[where] = value
        content[b"labels"] = labels
    elif what == "labels":
        content[b"labels"] = {
            "short": labels[:-1],
            "long": labels + [0],
            "array": np.array(labels, dtype=np.int64),
            "2-D": np.array(labels, dtype=np.int64).reshape(2, -1),
            "str": [str(v) for v in labels],
        }[where]
    elif what == "data":
        content[b"data"] = {
            "uint16": data.astype(np.uint16),
            "int8": data.astype(np.int8),
            "3071": data[:, :3071],
            "1-D": data.reshape(-1),
            "empty": data[:0],
            "list": data.tolist(),
            "float": data.astype(np.float32),
        }[where]
    elif what == "drop":
        del content[where]
    else:
        content[where.decode()] = content.pop(where)
    return content


class CifarKind:
    name = "cifar"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @cached_property
    def folder(self) -> Path:
        from qtrain.data.cifar import CIFAR10

        return self.originals.cifar / CIFAR10.folder

    @cached_property
    def files(self) -> list[str]:
        from qtrain.data.cifar import CIFAR10

        return [*CIFAR10.train_files, *CIFAR10.test_files, CIFAR10.meta_file]

    def cases(self):
        def for_file(name: str):
            data = (self.folder / name).read_bytes()
            hot = fm.hot_offsets(data, (b"labels", b"data", b"_reconstruct", b"names"))
            options = [st.tuples(st.just("bytes"), fm.byte_mutations(data, hot))]
            if name != "batches.meta":
                options.append(st.tuples(st.just("dict"), cifar_dict_mutations()))
            return st.tuples(st.just(name), st.one_of(*options))

        return st.tuples(st.sampled_from(["library", "library", "library", "cli"]),
                         st.sampled_from(self.files).flatmap(for_file))  # fmt: skip

    def mutate(self, name: str, how, mutation) -> bytes:
        data = (self.folder / name).read_bytes()
        if how == "bytes":
            return mutation.apply(data)
        content = ReferenceUnpickler(io.BytesIO(data), encoding="bytes").load()
        return pickle.dumps(edit_batch(content, mutation), protocol=4)

    def expected(self, root: Path):
        """(train images, train labels, test images, test labels, names) or None."""
        from qtrain.data.cifar import CIFAR10

        folder = root / CIFAR10.folder
        train = [reference_batch((folder / n).read_bytes(), False) for n in CIFAR10.train_files]
        test = reference_batch((folder / CIFAR10.test_files[0]).read_bytes(), False)
        names = reference_batch((folder / CIFAR10.meta_file).read_bytes(), True)
        if any(part is None for part in (*train, test, names)):
            return None
        return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                test[0], test[1], names)  # fmt: skip

    def check(self, case, folder: Path) -> Verdict:
        import qtrain.data as qdata

        via, (name, (how, mutation)) = case
        root = folder / "cifar"
        shutil.copytree(self.originals.cifar, root)
        (root / self.folder.name / name).write_bytes(self.mutate(name, how, mutation))
        expected = self.expected(root)
        original = self.expected(self.originals.cifar)

        def accepted(splits) -> Verdict:
            if expected is None:
                return Verdict("silent", f"{name}: a file without the CIFAR structure was read")
            got = (
                splits.train.images.numpy(),
                splits.train.labels.numpy(),
                splits.test.images.numpy(),
                splits.test.labels.numpy(),
                splits.class_names,
            )
            same = all(np.array_equal(a, b) for a, b in zip(got[:4], expected[:4]))
            if not same or got[4] != expected[4]:
                return Verdict("silent", f"{name}: the data read differ from the file's")
            unchanged = all(np.array_equal(a, b) for a, b in zip(expected[:4], original[:4]))
            return Verdict("same" if unchanged and expected[4] == original[4] else "read")

        verdict = call_verdict(call_reader(lambda: qdata.load("cifar10", root)), accepted)
        if via != "cli" or not verdict.ok:
            return verdict
        result = run_cli(*cifar_cli_args(root, folder / "run"))

        def trained(_result) -> Verdict:
            if verdict.outcome != "same":
                return verdict
            got = without_timings(read_jsonl(folder / "run" / "metrics.jsonl"))
            if same_value(got, self.originals.cifar_train):
                return verdict
            return Verdict("silent", "the same data trained to other numbers")

        cli = cli_verdict(result, trained)
        if cli.outcome == "refused" and verdict.outcome != "refused":
            return Verdict("wrongly refused", f"read by the library, refused by train: {cli}")
        return cli


# -- text files --------------------------------------------------------------------------------


def reference_text(data: bytes) -> str | None:
    """The text of a file, None when it must be refused (empty, NUL bytes, not UTF-8)."""
    if not data or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class TextKind:
    name = "text"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    def cases(self):
        data = self.originals.text.read_bytes()
        return st.tuples(st.sampled_from(["library", "library", "library", "cli"]),
                         fm.byte_mutations(data))  # fmt: skip

    def check(self, case, folder: Path) -> Verdict:
        import qtrain.data as qdata

        via, mutation = case
        path = folder / "text.txt"
        data = mutation.apply(self.originals.text.read_bytes())
        path.write_bytes(data)
        text = reference_text(data)

        def accepted(splits) -> Verdict:
            if text is None:
                return Verdict("silent", "a file that is not UTF-8 text was read")
            ids = torch.cat([splits.train, splits.test]).tolist()
            if "".join(splits.vocab[i] for i in ids) != text:
                return Verdict("silent", "the token ids do not spell the file's text")
            return Verdict("same" if text == TEXT else "read")

        verdict = call_verdict(
            call_reader(
                lambda: qdata.load("shakespeare-char", folder, text_file=str(path), block_size=8)
            ),  # fmt: skip
            accepted,
        )
        if via != "cli":
            return verdict
        run = folder / "run"
        result = run_cli("train", *GPT, "--set", f"text_file={path}", "--out", run)

        def trained(_result) -> Verdict:
            from qtrain.train.checkpoint import load_checkpoint

            if text is None:
                return Verdict("silent", "training accepted a file that is not UTF-8 text")
            recorded = load_checkpoint(run / "checkpoint.pt")["data"]["sha256"]
            if recorded != hashlib.sha256(text.encode()).hexdigest():
                return Verdict("silent", "the run recorded the SHA-256 of another text")
            got = without_timings(read_jsonl(run / "metrics.jsonl"))
            if text == TEXT and not same_value(got, self.originals.text_train):
                return Verdict("silent", "the same text trained to other numbers")
            return Verdict("same" if text == TEXT else "read")

        cli = cli_verdict(result, trained)
        if cli.outcome == "refused" and verdict.ok and verdict.outcome != "refused":
            return Verdict("wrongly refused", f"read by the library, refused by train: {cli}")
        return cli


# -- ImageNet folders --------------------------------------------------------------------------

IMAGE_HEADERS = (b"\xff\xc0", b"\xff\xda", b"IHDR", b"IDAT")  # JPEG frame and scan, PNG chunks
IMAGE_SIDE, RESIZE_SIDE = 16, 18


LAYOUT_OPS = ("rename file", "delete file", "move file", "rename class", "rename class in train",
              "add class", "add class in train", "junk image", "empty image", "folder as image",
              "delete class in val")  # fmt: skip
NEW_NAMES = ("x.JPEG", "x.jpeg.bak", "x.txt", "X.PNG", ".hidden.jpg", "x.webp", "x", "x.tiff")


def apply_layout(root: Path, op: str, pick: int, name: str, junk: bytes) -> None:
    files = imagenet_images(root)
    path = files[pick % len(files)]
    classes = sorted({p.parent for p in files})
    if op == "rename file":
        path.rename(path.with_name(name))
    elif op == "delete file":
        path.unlink()
    elif op == "move file":
        other = [c for c in classes if c.parent == path.parent.parent and c != path.parent]
        path.rename(other[pick % len(other)] / ("moved-" + path.name))
    elif op in ("rename class", "rename class in train"):
        label = path.parent.name
        for split in ("train",) if op.endswith("train") else ("train", "val"):
            (root / split / label).rename(root / split / ("z" + label))
    elif op in ("add class", "add class in train"):
        for split in ("train",) if op.endswith("train") else ("train", "val"):
            (root / split / "n00").mkdir()
    elif op == "junk image":
        (path.parent / name).write_bytes(junk)
    elif op == "empty image":
        (path.parent / "empty.jpg").write_bytes(b"")
    elif op == "folder as image":
        (path.parent / "folder.jpg").mkdir()
    elif op == "delete class in val":
        shutil.rmtree(root / "val" / IMAGENET_CLASSES[pick % 2])


def reference_scan(root: Path):
    """[(path, label)] of train and val as the documented layout says, or None (refused)."""
    from qtrain.data.imagenet import IMAGE_EXTENSIONS

    splits = []
    for split in ("train", "val"):
        folder = root / split
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if splits and classes != splits[0][1]:
            return None
        samples = [
            (folder / c / f.name, label)
            for label, c in enumerate(classes)
            for f in sorted((folder / c).iterdir())
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
        ]
        if not samples:
            return None
        splits.append((samples, classes))
    return splits


def reference_pixels(path: Path):
    """uint8 [3, S, S] of the evaluation transform of what Pillow decodes, None if it cannot."""
    from PIL import Image

    from qtrain.data.imagenet import center_crop, resize_shorter, to_uint8

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return to_uint8(center_crop(resize_shorter(rgb, RESIZE_SIDE), IMAGE_SIDE))
    except Exception:
        return None


class ImageNetKind:
    name = "imagenet"

    def __init__(self, originals: Originals) -> None:
        self.originals = originals

    @staticmethod
    def relative(root: Path, scan, pixels) -> list:
        """The samples (path below `root`, label) and their pixels, comparable across folders."""
        return [(str(p.relative_to(root)), label, pixels[p].tolist())
                for samples, _ in scan for p, label in samples]  # fmt: skip

    @cached_property
    def original(self) -> list:
        root = self.originals.imagenet
        scan = reference_scan(root)
        pixels = {p: reference_pixels(p) for samples, _ in scan for p, _ in samples}
        return self.relative(root, scan, pixels)

    def cases(self):
        files = imagenet_images(self.originals.imagenet)

        def mutations(data: bytes):  # near the headers that give an image's size
            return fm.byte_mutations(data, fm.hot_offsets(data, IMAGE_HEADERS))

        by_file = st.integers(0, len(files) - 1).flatmap(
            lambda i: st.tuples(st.just("bytes"), st.just(i), mutations(files[i].read_bytes()))
        )
        layout = st.tuples(
            st.just("layout"),
            st.integers(0, len(files) - 1),
            st.tuples(
                st.sampled_from(LAYOUT_OPS), st.sampled_from(NEW_NAMES), st.binary(max_size=64)
            ),  # fmt: skip
        )
        return st.tuples(st.sampled_from(["library"] * 5 + ["cli"]),
                         st.one_of(by_file, layout))  # fmt: skip

    def check(self, case, folder: Path) -> Verdict:
        from qtrain.data.imagenet import FolderImages, load_imagenet

        via, (how, pick, mutation) = case
        root = folder / "imagenet"
        shutil.copytree(self.originals.imagenet, root)
        if how == "bytes":
            path = imagenet_images(root)[pick]
            path.write_bytes(mutation.apply(path.read_bytes()))
        else:
            apply_layout(root, mutation[0], pick, mutation[1], mutation[2])
        scan = reference_scan(root)
        pixels = None
        if scan is not None:
            pixels = {p: reference_pixels(p) for samples, _ in scan for p, _ in samples}
        expected_ok = scan is not None and all(v is not None for v in pixels.values())

        def read():
            splits = load_imagenet(root, image_size=IMAGE_SIDE)
            got = {}
            for part in (splits.train, splits.test):
                images = FolderImages(part, False, IMAGE_SIDE, RESIZE_SIDE)
                crops = FolderImages(part, True, IMAGE_SIDE, RESIZE_SIDE)
                for i, (path, _) in enumerate(part.samples):
                    got[path] = images[(i, 0)][0]
                    crops[(i, 5)]
            return splits, got

        def accepted(value) -> Verdict:
            splits, got = value
            if not expected_ok:
                return Verdict("silent", "a folder with an undecodable image or a bad layout "
                               "was read")  # fmt: skip
            if [splits.train.samples, splits.test.samples] != [s for s, _ in scan]:
                return Verdict("silent", "the samples differ from the folders")
            if any(not torch.equal(got[p], pixels[p]) for p in got):
                return Verdict("silent", "pixels differ from what Pillow decodes")
            return Verdict("same" if self.relative(root, scan, pixels) == self.original else "read")

        verdict = call_verdict(call_reader(read), accepted)
        if via != "cli" or not verdict.ok:
            return verdict
        cli = cli_verdict(imagenet_cli(root, folder / "run"), lambda _r: verdict)
        if cli.outcome == "refused" and verdict.outcome != "refused":
            return Verdict("wrongly refused", f"read by the library, refused by train: {cli}")
        return cli
