"""scikit-learn's handwritten digits: 1,797 real 8×8 grayscale images that need no download.

Pixel intensities 0..16 are rescaled to uint8 by round(v·255/16). The split is fixed:
300 test images stratified by class (30 per class, ±1) with ``random_state=0``, 1,497 for
training. Augmentation is off by default: on an 8×8 digit a 4-pixel shift moves half of it
out of the frame, and a mirror image of a digit is not the same digit.
"""

from __future__ import annotations

import numpy as np
import torch

from qtrain.base.optional import require

from .arrays import ArrayDataset, DataSplits, channel_stats

TEST_SIZE = 300
SPLIT_SEED = 0
MAX_INTENSITY = 16


def load_digits() -> DataSplits:
    """The digits as `DataSplits` (1,497 train / 300 test, 1 channel, 8×8, 10 classes)."""
    purpose = "the digits data set (shipped with scikit-learn)"
    bunch = require("sklearn.datasets", "demo", purpose).load_digits()
    train_test_split = require("sklearn.model_selection", "demo", purpose).train_test_split
    pixels = np.rint(bunch.images * (255 / MAX_INTENSITY)).astype(np.uint8)[:, None]  # [N,1,8,8]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    train = ArrayDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    test = ArrayDataset(torch.from_numpy(test_x), torch.from_numpy(test_y))
    mean, std = channel_stats(train.images)
    return DataSplits(
        train=train,
        test=test,
        num_classes=10,
        in_channels=1,
        image_size=8,
        mean=mean,
        std=std,
        augment=False,
        name="digits",
        class_names=[str(digit) for digit in range(10)],
    )
