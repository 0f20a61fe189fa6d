"""The crop and flip options (`crop_padding`, `crop_fill`, `flip`): what each image of a
training batch shows, exact resume and sharding under them, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtrain.data as data
from qtrain.base.errors import UserError
from qtrain.data.augment import Augmentation, crop_flip, draw_augmentation
from qtrain.train.config import RunConfig

ALTERNATING = Augmentation(padding=0, flip="alternating")
RANDOM = Augmentation(padding=0, flip="random")


@pytest.fixture(scope="module")
def splits() -> data.DataSplits:
    """400 random 8×8 images whose label is their index, so a batch says which image is which."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8, generator=generator)
    train = data.ArrayDataset(images, torch.arange(400))
    test = data.ArrayDataset(images[:10], torch.arange(10))
    return data.DataSplits(train, test, 400, 3, 8, (0.0,) * 3, (1.0,) * 3, True, "indexed")


def loader(splits, augmentation: Augmentation, seed: int = 5, **options) -> data.BatchLoader:
    return splits.loader("train", 40, seed=seed, augmentation=augmentation, **options)


def shown(loader: data.BatchLoader, epoch: int) -> torch.Tensor:
    """The images of `epoch` in the data set's order (float [400, 3, 8, 8])."""
    xs, ys = zip(*loader.epoch(epoch), strict=True)
    out = torch.empty(400, 3, 8, 8)
    out[torch.cat(ys)] = torch.cat(xs)
    return out


def mirrored(splits, images: torch.Tensor) -> torch.Tensor:
    """bool [400]: which of `images` (padding 0) are the stored image mirrored."""
    stored = splits.train.images.float()
    same = (images == stored).flatten(1).all(1)
    flipped = (images == stored.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())  # no crop: every image is itself or its mirror
    return flipped


def test_reflect_fill_matches_a_per_image_reflection():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 9, 11), dtype=torch.uint8, generator=generator)
    dy, dx, flip = draw_augmentation(48, 2, generator)
    got = crop_flip(images, dy, dx, flip, 2, "reflect")
    for i in range(48):
        padded = F.pad(images[i : i + 1].float(), (2,) * 4, mode="reflect")[0]
        crop = padded[:, dy[i] : dy[i] + 9, dx[i] : dx[i] + 11]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(got[i].float(), expected), i
    # a shift of one pixel right shows the mirror of column 1 at the left edge, not a zero
    shifted = crop_flip(images, dy * 0 + 2, dx * 0 + 1, flip & False, 2, "reflect")
    assert torch.equal(shifted[:, :, :, 0], images[:, :, :, 1])
    zeros = crop_flip(images, dy * 0 + 2, dx * 0 + 1, flip & False, 2, "zeros")
    assert int(zeros[:, :, :, 0].max()) == 0


def test_alternating_flip_shows_every_image_both_ways_in_any_two_epochs(splits):
    batches = loader(splits, ALTERNATING)
    flips = [mirrored(splits, shown(batches, epoch)) for epoch in range(4)]
    for epoch in range(3):
        assert bool((flips[epoch] ^ flips[epoch + 1]).all()), epoch
    assert torch.equal(flips[0], flips[2])
    assert 150 < int(flips[0].sum()) < 250  # the first flips are drawn, about half of them
    # another seed draws other first flips
    other = mirrored(splits, shown(loader(splits, ALTERNATING, seed=6), 0))
    assert not torch.equal(other, flips[0])


def test_random_flip_repeats_the_orientation_about_half_the_time(splits):
    batches = loader(splits, RANDOM)
    first, second = (mirrored(splits, shown(batches, epoch)) for epoch in (0, 1))
    assert 150 < int((first == second).sum()) < 250


def test_alternating_flip_keeps_the_random_crops(splits):
    """The crop offsets are the random recipe's draws; only the flips differ, so every image
    is the random recipe's image or its mirror, and about half are each."""
    for epoch in (0, 1):
        alternate = shown(loader(splits, Augmentation(padding=2, flip="alternating")), epoch)
        plain = shown(loader(splits, Augmentation(padding=2)), epoch)
        same = (alternate == plain).flatten(1).all(1)
        mirror = (alternate.flip(-1) == plain).flatten(1).all(1)
        assert bool((same | mirror).all())
        assert 150 < int(same.sum()) < 250


@pytest.mark.parametrize("start", [1, 6])
def test_resume_inside_an_epoch_gives_the_uninterrupted_batches(splits, start):
    augmentation = Augmentation(padding=2, fill="reflect", flip="alternating")
    whole = list(loader(splits, augmentation).epoch(3))
    resumed = list(loader(splits, augmentation).epoch(3, start_batch=start))
    assert len(resumed) == len(whole) - start
    for (x, y), (x0, y0) in zip(resumed, whole[start:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_union_to_the_single_process_batch(splits, world_size):
    augmentation = Augmentation(padding=2, fill="reflect", flip="alternating")
    single = list(loader(splits, augmentation).epoch(1))
    ranks = [
        list(loader(splits, augmentation, rank=r, world_size=world_size).epoch(1))
        for r in range(world_size)
    ]
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][b][0] for r in range(world_size)]), x)
        assert torch.equal(torch.cat([ranks[r][b][1] for r in range(world_size)]), y)


def test_the_default_is_the_usual_recipe_bit_for_bit(splits):
    usual = list(splits.loader("train", 40, seed=5).epoch(2))
    explicit = list(loader(splits, Augmentation(4, "zeros", "random")).epoch(2))
    for (x, y), (x0, y0) in zip(usual, explicit, strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"crop_padding": -1}, "crop_padding must be a whole number of pixels >= 0"),
        ({"crop_padding": 1.5}, "crop_padding must be a whole number of pixels >= 0"),
        ({"crop_padding": True}, "crop_padding must be a whole number of pixels >= 0"),
        ({"crop_fill": "mirror"}, "unknown crop_fill 'mirror'"),
        ({"flip": "alternate"}, "did you mean 'alternating'"),
    ],
)
def test_impossible_values_are_refused_by_the_config(values, says):
    with pytest.raises(UserError, match=says):
        RunConfig(**values).validate()


def test_a_reflection_wider_than_the_image_is_refused_when_the_loader_is_built(splits):
    with pytest.raises(UserError, match="must be smaller than its 8×8 pixels"):
        loader(splits, Augmentation(padding=8, fill="reflect"))
    loader(splits, Augmentation(padding=8, fill="zeros"))  # zeros may reach past the image
    # a loader that does not augment never crops
    splits.loader("test", 40, seed=5, augmentation=Augmentation(padding=8, fill="reflect"))
