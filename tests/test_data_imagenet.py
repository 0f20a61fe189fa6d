"""ImageNet folders: scanning, the standard transforms, workers, resume and sharding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import qtrain.data as data
from qtrain.data.imagenet import (
    FolderImages,
    center_crop,
    random_resized_crop_box,
    resize_shorter,
    to_uint8,
)

Image = pytest.importorskip("PIL.Image")

CLASSES = ["n01440764", "n01443537", "n01484850"]
SIZES = [(40, 30), (30, 44), (64, 64), (50, 20)]


def write_tree(root: Path, per_class: int) -> None:
    generator = torch.Generator().manual_seed(len(str(root)))
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            width, height = SIZES[(i + label) % len(SIZES)]
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator)
            image = Image.fromarray(pixels.to(torch.uint8).numpy())
            image.save(folder / f"img_{i}.JPEG", quality=90)
        (folder / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_tree(root / "train", per_class=4)
    write_tree(root / "val", per_class=2)
    return root


def make_loader(root, batch_size=4, train=True, **kw):
    splits = data.load_imagenet(root)
    folder = splits.train if train else splits.test
    options = dict(train=train, seed=3, num_workers=0, image_size=24, resize_size=28)
    options.update(kw)
    return data.ImageNetLoader(folder, batch_size, **options)


def test_folders_are_scanned_in_class_order(imagenet_root):
    splits = data.load_imagenet(imagenet_root)
    assert splits.class_names == CLASSES and splits.num_classes == 3
    assert len(splits.train) == 12 and len(splits.test) == 6
    assert [label for _, label in splits.train.samples] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(path.suffix == ".JPEG" for path, _ in splits.train.samples)
    assert splits.mean == pytest.approx((123.675, 116.28, 103.53))


def test_train_batches_are_normalised_crops(imagenet_root):
    loader = make_loader(imagenet_root)
    assert len(loader) == 3
    batches = list(loader.epoch(0))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    mean = torch.tensor(data.ImageNetSplits.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.ImageNetSplits.std).view(1, 3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() > -0.01 and pixels.max() < 255.01


def test_eval_transform_is_resize_then_centre_crop(imagenet_root):
    loader = make_loader(imagenet_root, train=False, batch_size=6)
    x, y = next(loader.epoch(0))
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    path = data.load_imagenet(imagenet_root).test.samples[0][0]
    with Image.open(path) as image:
        expected = to_uint8(center_crop(resize_shorter(image.convert("RGB"), 28), 24))
    mean = torch.tensor(data.ImageNetSplits.mean).view(3, 1, 1)
    std = torch.tensor(data.ImageNetSplits.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (expected.float() - mean) / std)


def test_batches_do_not_depend_on_workers_and_resume_exactly(imagenet_root):
    serial = list(make_loader(imagenet_root).epoch(1))
    parallel = list(make_loader(imagenet_root, num_workers=2).epoch(1))
    resumed = list(make_loader(imagenet_root).epoch(1, start_batch=2))
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert torch.equal(resumed[0][0], serial[2][0])
    assert not torch.equal(serial[0][0], next(make_loader(imagenet_root).epoch(2))[0])


def test_rank_slices_union_to_the_single_process_batch(imagenet_root):
    single = list(make_loader(imagenet_root).epoch(0))
    ranks = [list(make_loader(imagenet_root, rank=r, world_size=2).epoch(0)) for r in range(2)]
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][b][0], ranks[1][b][0]]), x)
        assert torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]]), y)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by world size 4"):
        make_loader(imagenet_root, batch_size=6, world_size=4)


def test_random_resized_crop_box_stays_inside_and_follows_the_scale():
    generator = torch.Generator().manual_seed(0)
    for width, height in [(500, 375), (100, 1000), (64, 64)]:
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, generator)
            assert 0 <= left <= left + w <= width and 0 <= top <= top + h <= height
            assert w * h >= 0.07 * width * height
    # An extreme aspect ratio falls back to a centred crop of ratio 3/4.
    assert random_resized_crop_box(10, 1000, generator) == (0, 493, 10, 13)


def test_missing_and_mismatched_folders_are_clear_errors(tmp_path, imagenet_root):
    with pytest.raises(data.DatasetNotFoundError, match="one subfolder per class"):
        data.load_imagenet(tmp_path / "absent")
    write_tree(tmp_path / "train", per_class=1)
    (tmp_path / "val" / "n0000").mkdir(parents=True)
    with pytest.raises(data.DataError, match="same class folders"):
        data.load_imagenet(tmp_path)
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    with pytest.raises(data.DataError, match="holds no images"):
        data.load_imagenet(empty)


def test_corrupt_image_names_the_file(tmp_path):
    write_tree(tmp_path / "train", per_class=1)
    write_tree(tmp_path / "val", per_class=1)
    broken = tmp_path / "train" / CLASSES[0] / "img_0.JPEG"
    broken.write_bytes(broken.read_bytes()[:40])
    images = FolderImages(data.load_imagenet(tmp_path).train, True, 24, 28)
    with pytest.raises(data.CorruptDataError, match="img_0.JPEG cannot be decoded"):
        images[(0, 1)]


def test_transforms_match_torchvision(imagenet_root):
    """Where torchvision is installed, its standard transforms give the same pixels."""
    transforms = pytest.importorskip("torchvision.transforms")
    functional = pytest.importorskip("torchvision.transforms.functional")
    path = data.load_imagenet(imagenet_root).train.samples[0][0]
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    ours = to_uint8(center_crop(resize_shorter(image, 28), 24))
    reference = transforms.Compose(
        [transforms.Resize(28), transforms.CenterCrop(24), transforms.PILToTensor()]
    )(image)
    assert torch.equal(ours, reference)
    left, top, w, h = random_resized_crop_box(*image.size, torch.Generator().manual_seed(0))
    cropped = image.crop((left, top, left + w, top + h)).resize((24, 24), Image.BILINEAR)
    expected = functional.resized_crop(image, top, left, h, w, [24, 24])
    assert torch.equal(to_uint8(cropped), functional.pil_to_tensor(expected))
