"""BatchLoader: normalisation, shuffling, batched augmentation, exact resume, sharding."""

from __future__ import annotations

import pytest
import torch

import qtrain.data as data
from qtrain.data.augment import crop_flip, draw_augmentation
from qtrain.data.loader import epoch_permutation, rank_slice

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def splits() -> data.DataSplits:
    return data.make_synthetic(num_train=100, num_test=37, num_classes=5, image_size=8)


def make_loader(splits, batch_size=16, **kw) -> data.BatchLoader:
    options = dict(mean=splits.mean, std=splits.std, train=True, augment=True, seed=7)
    options.update(kw)
    dataset = splits.train if options["train"] else splits.test
    return data.BatchLoader(dataset, batch_size, **options)


def reference_crop_flip(image, dy, dx, flip, padding):
    """Per-image reference: pad, crop at (dy, dx), mirror."""
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    crop = padded[:, dy : dy + height, dx : dx + width]
    return crop.flip(-1) if flip else crop


def test_crop_flip_matches_per_image_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 10, 12), dtype=torch.uint8, generator=generator)
    dy, dx, flip = draw_augmentation(64, 4, generator)
    got = crop_flip(images, dy, dx, flip, 4)
    for i in range(64):
        expected = reference_crop_flip(images[i], dy[i], dx[i], flip[i], 4)
        assert torch.equal(got[i], expected), i
    assert set(dy.tolist()) == set(range(9)) and 0 < int(flip.sum()) < 64


def test_crop_flip_identity_and_mirror():
    images = torch.randint(0, 256, (4, 1, 5, 5), dtype=torch.uint8)
    zero = torch.zeros(4, dtype=torch.int64)
    assert torch.equal(crop_flip(images, zero + 2, zero + 2, zero.bool(), 2), images)
    assert torch.equal(crop_flip(images, zero, zero, ~zero.bool(), 0), images.flip(-1))


def test_test_split_is_ordered_normalised_and_complete(splits):
    loader = make_loader(splits, batch_size=10, train=False)
    assert len(loader) == 4 and not loader.drop_last
    xs, ys = zip(*loader.epoch(0), strict=True)
    assert [len(y) for y in ys] == [10, 10, 10, 7]
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    expected = (splits.test.images.float() - mean) / std
    torch.testing.assert_close(torch.cat(xs), expected, rtol=0, atol=1e-6)
    assert torch.equal(torch.cat(ys), splits.test.labels)
    assert xs[0].dtype == torch.float32 and ys[0].dtype == torch.int64


def test_training_epoch_is_a_seeded_permutation(splits):
    loader = make_loader(splits, batch_size=16, augment=False)
    assert len(loader) == 6 and loader.drop_last and loader.num_samples == 96
    order = epoch_permutation(100, 7, 0)
    ys = torch.cat([y for _, y in loader.epoch(0)])
    assert torch.equal(ys, splits.train.labels[order[:96]])
    assert not torch.equal(epoch_permutation(100, 7, 1), order)
    assert not torch.equal(epoch_permutation(100, 8, 0), order)
    assert torch.equal(epoch_permutation(100, 7, 0), order)


def test_augmentation_changes_images_but_keeps_labels(splits):
    plain = list(make_loader(splits, augment=False).epoch(2))
    augmented = list(make_loader(splits, augment=True).epoch(2))
    for (x0, y0), (x1, y1) in zip(plain, augmented, strict=True):
        assert torch.equal(y0, y1)
        assert not torch.equal(x0, x1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [0, 1, 4, 6])
def test_resume_reproduces_the_uninterrupted_epoch(splits, device, start):
    full = list(make_loader(splits, device=device).epoch(3))
    resumed = list(make_loader(splits, device=device).epoch(3, start_batch=start))
    assert len(resumed) == len(full) - start
    for (x0, y0), (x1, y1) in zip(full[start:], resumed, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert x1.device.type == device


def test_same_seed_same_batches_across_loaders(splits):
    first = [x for x, _ in make_loader(splits).epoch(1)]
    second = [x for x, _ in make_loader(splits).epoch(1)]
    other = [x for x, _ in make_loader(splits, seed=8).epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("train", [True, False])
def test_rank_slices_union_to_the_single_process_batch(splits, world_size, train):
    single = list(make_loader(splits, train=train).epoch(5))
    ranks = [
        list(make_loader(splits, train=train, rank=r, world_size=world_size).epoch(5))
        for r in range(world_size)
    ]
    assert all(len(batches) == len(single) for batches in ranks)
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][b][0] for r in range(world_size)]), x)
        assert torch.equal(torch.cat([ranks[r][b][1] for r in range(world_size)]), y)
        assert ranks[0][b][0].shape[0] == -(-x.shape[0] // world_size)


def test_rank_slice_is_contiguous_and_covers():
    for size in (0, 1, 7, 16):
        for world in (1, 3, 4):
            parts = [rank_slice(size, r, world) for r in range(world)]
            assert parts[0].start == 0 and parts[-1].stop == size
            assert all(a.stop == b.start for a, b in zip(parts, parts[1:], strict=False))


def test_batch_not_divisible_by_world_size_names_both(splits):
    with pytest.raises(ValueError, match="batch size 18 is not divisible by world size 4"):
        make_loader(splits, batch_size=18, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        make_loader(splits, rank=2, world_size=2)


def test_channels_last_output(splits):
    x, _ = next(make_loader(splits, channels_last=True).epoch(0))
    assert x.is_contiguous(memory_format=torch.channels_last)
    x, _ = next(make_loader(splits).epoch(0))
    assert x.is_contiguous()


def test_bad_arguments_are_rejected(splits):
    with pytest.raises(ValueError, match="one per channel"):
        make_loader(splits, mean=(1.0,), std=(1.0,))
    with pytest.raises(ValueError, match="std > 0"):
        make_loader(splits, std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="positive integer"):
        make_loader(splits, batch_size=0)
    with pytest.raises(ValueError, match="larger than the 100 images"):
        make_loader(splits, batch_size=128)
    with pytest.raises(ValueError, match=r"start_batch 7 is outside 0\.\.6"):
        make_loader(splits).epoch(0, start_batch=7)


def test_drop_last_can_be_overridden(splits):
    loader = make_loader(splits, batch_size=16, drop_last=False)
    assert len(loader) == 7 and loader.num_samples == 100
    assert sum(len(y) for _, y in loader.epoch(0)) == 100


def test_caller_thread_count_is_untouched_between_batches(splits):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in make_loader(splits).epoch(0):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
