"""The embedded digits, the synthetic set, and `qtrain.data.load` dispatch."""

from __future__ import annotations

import sys

import pytest
import torch

import qtrain.data as data

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits() -> data.DataSplits:
    return data.load("digits")


def test_digits_split_is_fixed_and_stratified(digits):
    assert (len(digits.train), len(digits.test)) == (1497, 300)
    assert digits.train.images.shape[1:] == (1, 8, 8) and digits.train.images.dtype == torch.uint8
    assert digits.test.labels.bincount().min() >= 29 and digits.test.labels.bincount().max() <= 31
    assert int(digits.train.images.max()) == 255 and int(digits.train.images.min()) == 0
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert not digits.augment and digits.class_names == [str(d) for d in range(10)]
    again = data.load("digits")
    assert torch.equal(again.test.images, digits.test.images)


def test_digits_pixels_are_rescaled_from_0_to_16(digits):
    values = set(digits.train.images.unique().tolist())
    assert values == {round(v * 255 / 16) for v in range(17)}


def test_digits_are_learnable_by_a_linear_model(digits):
    """A softmax regression on the loader's normalised pixels reaches > 90 % test accuracy."""
    torch.manual_seed(0)
    options = dict(mean=digits.mean, std=digits.std, augment=False, seed=0)
    x, y = next(data.BatchLoader(digits.train, 1497, train=False, **options).epoch(0))
    xt, yt = next(data.BatchLoader(digits.test, 300, train=False, **options).epoch(0))
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(25):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        optimizer.step()
    accuracy = (model(xt.flatten(1)).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.9


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(data.MissingDependencyError, match=r"pip install 'qtrain\[demo\]'"):
        data.load("digits")


def test_synthetic_is_seeded_shaped_and_learnable():
    splits = data.load("synthetic")
    assert splits.train.images.shape == (512, 3, 8, 8) and len(splits.test) == 128
    assert torch.equal(data.load("synthetic").train.images, splits.train.images)
    big = data.load("synthetic", image_size=32, in_channels=1, num_classes=10, num_train=50)
    assert big.train.images.shape == (50, 1, 32, 32) and big.num_classes == 10
    # Nearest class mean on the training set classifies the test set almost perfectly.
    train_x = splits.train.images.flatten(1).float()
    means = torch.stack([train_x[splits.train.labels == k].mean(0) for k in range(4)])
    guess = torch.cdist(splits.test.images.flatten(1).float(), means).argmin(1)
    assert (guess == splits.test.labels).float().mean() > 0.95


def test_unknown_data_set_and_option_are_clear_errors():
    with pytest.raises(ValueError, match=r"did you mean 'digits'\?.*cifar10, cifar100"):
        data.load("digit")
    with pytest.raises(ValueError, match="has no option colour; its options are: none"):
        data.load("digits", colour=True)
    with pytest.raises(ValueError, match="num_classes >= 1"):
        data.load("synthetic", num_classes=0)
    assert data.list_datasets() == [
        "cifar10",
        "cifar100",
        "digits",
        "imagenet",
        "shakespeare-char",
        "synthetic",
    ]


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRAIN_DATA", str(tmp_path))
    assert data.default_root() == tmp_path
    monkeypatch.delenv("QTRAIN_DATA")
    assert data.default_root().parts[-2:] == (".cache", "qtrain")
    monkeypatch.setenv("QTRAIN_DATA", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
        data.load("cifar100")
