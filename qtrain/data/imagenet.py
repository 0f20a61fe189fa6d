"""ImageNet from the standard folder layout, with the usual ResNet training transforms.

    root/train/<class>/<image>.JPEG      root/val/<class>/<image>.JPEG

The folder ``val`` is the data set's "test" split, as in every qtrain data set. Classes are
the sorted folder names of ``train/`` (label = position). Per image, as in the reference
PyTorch ImageNet recipe (torchvision's RandomResizedCrop / Resize / CenterCrop on PIL images,
bilinear):

    train: area fraction s ~ U(0.08, 1), aspect ratio r ~ logU(3/4, 4/3), crop
           w = √(s·A·r) × h = √(s·A/r) at a uniform position (10 tries, else the centre
           crop of the largest allowed ratio), resize to 224×224, mirror with p = ½
    eval:  resize the shorter side to 256, centre crop 224×224

Decoding and these per-image steps run in DataLoader worker processes and yield uint8
[3, 224, 224]; normalisation (x − mean)/std happens per batch on the device. Only Pillow is
needed. The random draws of an image are a pure function of (seed, epoch, position in the
epoch), so batches do not depend on the number of workers and a resumed epoch repeats
exactly; sharding over ranks is the same as `BatchLoader`'s.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from qtrain.base.errors import UserError
from qtrain.base.optional import require

from .arrays import check_split
from .augment import USUAL_AUGMENTATION, Augmentation
from .errors import CorruptDataError, DataError, DatasetNotFoundError
from .loader import Batch, Batching, augmentation_seed, epoch_permutation, rank_slice

# The usual ImageNet statistics, converted to pixel units (0..255) like every qtrain set.
IMAGENET_MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255 * s for s in (0.229, 0.224, 0.225))
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _pil():
    return require("PIL.Image", "imagenet", "ImageNet decoding")


@dataclass
class ImageFolder:
    """Image files of one split with their labels; ``class_names[label]`` names a label."""

    root: Path
    samples: list[tuple[Path, int]]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.samples)

    def take(self, indices: torch.Tensor) -> ImageFolder:
        """The images at ``indices`` (int64 [n]), in that order."""
        return replace(self, samples=[self.samples[i] for i in indices.tolist()])


@dataclass
class ImageNetSplits:
    """The train and test (``val/``) folders plus what models and loaders need to know.

    ``image_size`` is the side of the crops the loaders yield (the model's input size).
    """

    train: ImageFolder
    test: ImageFolder
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_channels: int = 3
    image_size: int = 224
    augment: bool = True
    name: str = "imagenet"

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        seed: int,
        device: torch.device | str = "cpu",
        augment: bool | None = None,
        augmentation: Augmentation = USUAL_AUGMENTATION,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        local_world_size: int = 1,
    ) -> ImageNetLoader:
        """An `ImageNetLoader` of ``split`` ("train" shuffles and augments, "test" does not).

        Crops are ``image_size``² after resizing the shorter side to 256/224 of it; training
        always uses random-resized crops and flips. Each of the ``local_world_size`` ranks of a
        node decodes with an equal share of the node's CPUs, one kept for itself.
        """
        check_split(split)
        if split == "train" and augment is False:
            raise UserError(
                "ImageNet training always uses random-resized crops and flips; remove augment=false"
            )
        if augmentation != USUAL_AUGMENTATION:
            raise UserError(
                "ImageNet training crops with random-resized crops and random flips; remove "
                "crop_padding, crop_fill and flip, which set the in-memory data sets' crop"
            )
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return ImageNetLoader(
            self.train if split == "train" else self.test,
            batch_size,
            train=split == "train",
            seed=seed,
            mean=self.mean,
            std=self.std,
            device=device,
            num_workers=max(1, (cpus or 1) // local_world_size - 1),
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
            image_size=self.image_size,
            resize_size=round(self.image_size * 256 / 224),
        )


def scan_folder(folder: Path, class_names: Sequence[str] | None = None) -> ImageFolder:
    """List ``folder/<class>/<image>``; labels follow ``class_names`` (default: sorted folders)."""
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"{folder} does not exist; put the ImageNet split there with one subfolder per class"
        )
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    names = list(class_names) if class_names is not None else found
    if class_names is not None and found != names:
        raise DataError(
            f"{folder} has class folders {found[:3]}… ({len(found)}) that differ from the "
            f"training classes ({len(names)}); give every split the same class folders"
        )
    samples = [
        (path, label)
        for label, name in enumerate(names)
        for path in sorted((folder / name).iterdir())
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise DataError(
            f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders; "
            "put the split's images in one folder per class"
        )
    return ImageFolder(folder, samples, names)


def load_imagenet(root: str | Path, image_size: int = 224) -> ImageNetSplits:
    """Scan ``root/train`` and ``root/val`` (same class folders) into `ImageNetSplits`.

    ``image_size`` is the side of the crops its loaders yield (224 for ResNet-18).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"ImageNet crops need image_size >= 1 (an integer), got {image_size!r}")
    root = Path(root).expanduser()
    train = scan_folder(root / "train")
    test = scan_folder(root / "val", train.class_names)
    names = train.class_names
    return ImageNetSplits(train, test, len(names), names, image_size=image_size)


def random_resized_crop_box(
    width: int, height: int, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) drawn as torchvision's RandomResizedCrop does."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        draws = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * draws[0])
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * draws[1])
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    # Fallback: the centre crop whose aspect ratio is the nearest allowed one.
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(image, size: int):
    """Resize a PIL image so its shorter side is ``size`` (torchvision's ``Resize(size)``)."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image if new == (width, height) else image.resize(new, _pil().BILINEAR)


def center_crop(image, size: int):
    """The centred ``size``×``size`` crop of a PIL image at least that large."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_uint8(image) -> torch.Tensor:
    """PIL RGB image → uint8 tensor [3, H, W]."""
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).contiguous()


def open_rgb(path: Path):
    """Decode ``path`` to an RGB PIL image; a broken file is a `CorruptDataError`."""
    image_module = _pil()
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")
    # Pillow reports a damaged file with OSError mostly, but its decoders raise these too, and
    # a header that claims more pixels than Image.MAX_IMAGE_PIXELS allows is refused unread.
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
            image_module.DecompressionBombError) as error:  # fmt: skip
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise CorruptDataError(
            f"{path} cannot be decoded as an image ({reason}); replace or delete the file"
        ) from None


class FolderImages(Dataset):
    """Decodes and transforms one image per key (index, sample seed) into uint8 [3, S, S]."""

    def __init__(self, folder: ImageFolder, train: bool, image_size: int, resize_size: int):
        self.folder = folder
        self.train = train
        self.image_size = image_size
        self.resize_size = resize_size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        path, label = self.folder.samples[index]
        image = open_rgb(path)
        size = self.image_size
        if self.train:
            generator = torch.Generator().manual_seed(sample_seed)
            left, top, w, h = random_resized_crop_box(*image.size, generator)
            image = image.crop((left, top, left + w, top + h)).resize((size, size), _pil().BILINEAR)
            if torch.rand(1, generator=generator).item() < 0.5:
                image = image.transpose(_pil().FLIP_LEFT_RIGHT)
        else:
            image = center_crop(resize_shorter(image, self.resize_size), size)
        return to_uint8(image), label


class ImageNetLoader(Batching):
    """Batches of an `ImageFolder` with the loader protocol of `Batching` (``len``, ``epoch``).

    ``batch_size`` is global; rank r of ``world_size`` gets the contiguous slice
    [r·B/W, (r+1)·B/W) of every global batch of the shared per-epoch permutation. ``mean``
    and ``std`` are in pixel units. ``num_workers`` processes decode and transform images.
    """

    def __init__(
        self,
        folder: ImageFolder,
        batch_size: int,
        *,
        train: bool,
        seed: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: torch.device | str = "cpu",
        num_workers: int = 4,
        drop_last: bool | None = None,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        image_size: int = 224,
        resize_size: int = 256,
    ) -> None:
        if not 0 < image_size <= resize_size:
            raise UserError(
                f"crop size {image_size} must be positive and at most the resize size "
                f"{resize_size}; pass a smaller image_size or a larger resize_size"
            )
        super().__init__(
            len(folder),
            batch_size,
            channels=3,
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
        self.images = FolderImages(folder, train, image_size, resize_size)
        self.num_workers = num_workers

    def batch_keys(self, epoch: int, start_batch: int) -> list[list[tuple[int, int]]]:
        """Per batch of this rank: the (image index, sample seed) keys, in order."""
        size = len(self.images)
        order = epoch_permutation(size, self.seed, epoch).tolist() if self.train else range(size)
        batches = []
        for b in range(start_batch, len(self)):
            first = b * self.batch_size
            positions = range(first, min(first + self.batch_size, size))
            mine = positions[rank_slice(len(positions), self.rank, self.world_size)]
            batches.append([(order[p], augmentation_seed(self.seed, epoch, p)) for p in mine])
        return batches

    def _batches(self, epoch: int, start_batch: int) -> Iterator[Batch]:
        loader = DataLoader(
            self.images,
            batch_sampler=self.batch_keys(epoch, start_batch),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            for pixels, labels in loader:
                x = self.normalise(pixels.to(self.device, non_blocking=True))
                yield x, labels.to(self.device, non_blocking=True)
        except CorruptDataError as error:
            raise CorruptDataError(worker_message(error)) from None


def worker_message(error: CorruptDataError) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback
    that the DataLoader puts before it when it raises the error again in this process."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
