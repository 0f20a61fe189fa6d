"""Training FLOPs of an image recipe: the arithmetic a result cost, whatever the machine.

    FLOP per training image  = the FLOPs of one forward and one backward pass of the run's
                               model on one image, as `torch.utils.flop_counter` counts them
    training FLOPs at step t = t × batch_size × FLOP per training image

The counter counts convolutions and matrix products (2 FLOP a multiply-add) in the forward
pass and in the gradients autograd computes: for a trained layer its input and weight
gradients, about twice its forward; a frozen layer (speednet's whitening filters, a buffer)
only the input gradient its successors need, and the first layer none. Elementwise work
(BatchNorm, activations, the loss, the optimizer's step and its rounding) is not counted, as
in airbench's and the literature's FLOP budgets; for speednet it is under 1% of the count.
Binary weights are counted as float multiply-adds: that is what the CPU computes.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from qtrain import data as qdata
from qtrain import models
from qtrain.train.config import RunConfig
from qtrain.train.settings import image_size

# BatchNorm in training mode needs more than one value per channel; the count is per image.
_IMAGES = 2


def training_flop_per_image(config: RunConfig) -> int:
    """The FLOPs of one training image's forward and backward pass (module docstring)."""
    info = qdata.dataset_info(config.dataset)
    # a set whose classes are known only once built is counted with 10: the head is a
    # negligible share of the count
    model = models.create(config.model, num_classes=info.num_classes or 10, width=config.width,
                          in_channels=info.in_channels, activations=config.activations)  # fmt: skip
    model.train()
    side = image_size(config)
    x = torch.randn(_IMAGES, info.in_channels, side, side)
    y = torch.zeros(_IMAGES, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() // _IMAGES
