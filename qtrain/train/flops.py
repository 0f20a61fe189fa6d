"""Training FLOPs of an image recipe: the arithmetic a result cost, whatever the machine (the
speedrun's tables), and the relative cost of a step at another image side (the time-budget
fit of a run with progressive resizing).

    FLOP per training image  = the FLOPs of one forward and one backward pass of the run's
                               model on one image, as `torch.utils.flop_counter` counts them
    training FLOPs at step t = t × batch_size × FLOP per training image

A run with progressive resizing (`qtrain.train.resizing`) trains each epoch at the side its
record names (`image_side`), so its FLOPs are summed epoch by epoch, each at its own side.

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
from qtrain.train.settings import image_size, model_options

# BatchNorm in training mode needs more than one value per channel; the count is per image.
_IMAGES = 2


def training_flop_per_image(config: RunConfig, side: int | None = None) -> int:
    """The FLOPs of one training image's forward and backward pass (module docstring), at
    the data set's side or at `side`."""
    info = qdata.dataset_info(config.dataset)
    # a set whose classes are known only once built is counted with 10: the head is a
    # negligible share of the count
    model = models.create(config.model, num_classes=info.num_classes or 10, width=config.width,
                          in_channels=info.in_channels, activations=config.activations,
                          options=model_options(config))  # fmt: skip
    model.train()
    side = side or image_size(config)
    x = torch.randn(_IMAGES, info.in_channels, side, side)
    y = torch.zeros(_IMAGES, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() // _IMAGES


def cumulative_training_flops(config: RunConfig, records: list[dict]) -> list[int]:
    """The training FLOPs up to the end of each record's epoch: Σ over epochs of its steps ×
    batch_size × the FLOP per image at the side it trained (`image_side`, else the data's)."""
    per_side: dict[int | None, int] = {}
    totals, total, step = [], 0, 0
    for record in records:
        side = record.get("image_side")
        if side not in per_side:
            per_side[side] = training_flop_per_image(config, side)
        total += (record["step"] - step) * config.batch_size * per_side[side]
        step = record["step"]
        totals.append(total)
    return totals


class StepCost:
    """The cost of a training step at image side s relative to one at side `reference`:
    FLOP(s) / FLOP(reference), FLOPs per image as `training_flop_per_image` counts them (a
    cache per side: each count builds the model)."""

    def __init__(self, config: RunConfig, reference: int) -> None:
        self.config = config
        self._flops: dict[int, int] = {}
        self._reference = self._of(reference)

    def _of(self, side: int) -> int:
        if side not in self._flops:
            self._flops[side] = training_flop_per_image(self.config, side)
        return self._flops[side]

    def __call__(self, side: int) -> float:
        return self._of(side) / self._reference
