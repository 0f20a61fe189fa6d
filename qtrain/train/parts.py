"""A run's parts, built from its config: data splits and loaders, its length in steps, the
model (whitened when asked), the method's optimizer and its learning-rate schedule.

Random streams: model initialisation, the train_subset draw, the held-out validation images
and the whitening images each come from their own stream of the run seed,
`stream_seed(seed, "init" | "subset" | "validation" | "whitening")`, as do the loaders' data
order and augmentation ("data-order", "augment"); the optimizer derives its rounding stream
from the seed itself.
"""

from __future__ import annotations

import math
import time

import torch

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.base.errors import UserError
from qtrain.base.streams import stream_seed
from qtrain.data.holdout import hold_out, sample_images, validation_loader
from qtrain.models.act_quant import act_quant_plan, apply_act_quant
from qtrain.models.conv_grad import im2col_weight_grads
from qtrain.models.whitening import whiten_model_
from qtrain.train.config import RunConfig
from qtrain.train.distributed import DistributedContext
from qtrain.train.schedules import Redraws, make_scheduler, redraw_schedule
from qtrain.train.settings import (
    data_options,
    is_text,
    method_settings,
    model_options,
    tokens_options,
)
from qtrain.train.start import resolved_init

# Steps between evaluations of a text run when eval_every is unset (nanoGPT's eval_interval).
DEFAULT_EVAL_EVERY = 250
WHITEN_IMAGES = 5000  # airbench whitens from 5,000 training images


def load_splits(config: RunConfig):
    """(the splits the run trains and tests on, the held-out validation images or None).

    `val_images` are held out first, then `train_subset` is drawn from what remains.
    """
    c = config
    options = {**data_options(c.dataset, c.model, c), **tokens_options(c)}
    splits = qdata.load(c.dataset, c.data_dir, download=c.download, **options)
    held_out = None
    if c.val_images:
        splits, held_out = hold_out(splits, c.val_images, c.seed)
    return qdata.subset_train(splits, c.train_subset, c.seed), held_out


def make_loaders(
    config: RunConfig, splits, held_out, device: torch.device, dist: DistributedContext
) -> tuple:
    """(train, test, validation or None) loaders; a text run's train "epoch" is `eval_every`
    steps of random windows and its test loader `eval_batches` fixed windows."""
    c = config
    if not is_text(c.dataset):
        return _image_loaders(c, splits, held_out, device, dist)
    common = dict(seed=c.seed, device=device)
    steps = c.eval_every or DEFAULT_EVAL_EVERY
    train = splits.loader("train", c.batch_size, steps=steps, **common)
    return train, splits.loader("test", c.batch_size, batches=c.eval_batches, **common), None


def _image_loaders(c: RunConfig, splits, held_out, device, dist: DistributedContext) -> tuple:
    common = dict(
        seed=c.seed,
        device=device,
        channels_last=c.channels_last,
        rank=dist.rank,
        world_size=dist.world_size,
        local_world_size=dist.local_world_size,
    )
    train = splits.loader(
        "train", c.batch_size, augment=c.augment, augmentation=c.augmentation, **common
    )
    test = splits.loader("test", c.eval_batch_size, **common)
    val = None
    if held_out is not None:
        val = validation_loader(splits, held_out, c.eval_batch_size, **common)
    if len(train) == 0:
        raise UserError(
            f"batch_size {c.batch_size} is larger than the {len(splits.train)} training "
            "images; lower {batch_size}",
            batch_size="batch_size",
        )
    return train, test, val


def run_length(config: RunConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(S, epochs): the run lasts S = min(epochs × steps per epoch, max_steps) optimizer steps
    (a text run with max_steps: S = max_steps, its "epochs" being only the evaluation cadence),
    over ⌈S / steps per epoch⌉ epochs."""
    c = config
    total_steps = c.epochs * steps_per_epoch
    if c.max_steps is not None:
        total_steps = min(total_steps, c.max_steps)
    if is_text(c.dataset) and c.max_steps is not None:
        total_steps = c.max_steps  # a text "epoch" is only the evaluation cadence
    return total_steps, math.ceil(total_steps / steps_per_epoch)


def make_model(config: RunConfig, splits, device: torch.device, *, fresh: bool = False):
    """The config's model for `splits`, initialised from the "init" stream, on `device`, with
    its activation quantization when `act_bits` is set (`with_act_quant`). A `fresh` run (not
    a resume, whose checkpoint holds the weights) of the hf model starts from the weights its
    folder holds, when it holds any."""
    c = config
    torch.manual_seed(stream_seed(c.seed, "init"))  # model initialisation
    options = model_options(c)
    if fresh and "hf_path" in options:
        options["pretrained"] = True
    model = models.create(
        c.model,
        num_classes=splits.num_classes,
        width=c.width,
        in_channels=splits.in_channels,
        activations=c.activations,
        options=options,
    )
    model = with_act_quant(config, model).to(device)
    if c.im2col_grad:
        im2col_weight_grads(model)
    if c.channels_last and not is_text(c.dataset):
        model = model.to(memory_format=torch.channels_last)
    return model


def with_act_quant(config: RunConfig, model):
    """`model` with the inputs of the linear layers `config.policy` quantizes quantized to
    `act_bits` bits after `act_norm` (`qtrain.models.act_quant`); unchanged without act_bits.
    The norms start at 1 and draw no random numbers, so the rest of the model is initialised
    as without them."""
    c = config
    if c.act_bits is None:
        return model
    plan = act_quant_plan(model, c.policy, c.act_bits, c.act_norm, name=c.model)
    return apply_act_quant(model, plan)


def whiten(model, splits, seed: int, device: torch.device) -> float:
    """Whiten the model's first layer from `WHITEN_IMAGES` training images drawn by the
    "whitening" stream (`qtrain.models.whitening`); returns the seconds taken."""
    started = time.perf_counter()
    images = sample_images(splits, WHITEN_IMAGES, seed, "whitening")
    loader = validation_loader(splits, images, len(images), seed=seed, device=device)
    x, _ = next(iter(loader.epoch(0)))  # normalised, not augmented
    whiten_model_(model, x)
    return time.perf_counter() - started


def make_optimizer(config: RunConfig, model):
    """The config's method over `model` (`qtrain.methods.create`): `momentum` is SGD's
    momentum and Adam's β₁ (the one knob that averages gradients in either), `beta2` Adam's β₂,
    `init` where the quantized weights start (`qtrain.train.start.resolved_init`)."""
    c = config
    return methods.create(
        c.method,
        model,
        seed=c.seed,
        momentum=c.momentum,
        bc_stochastic=c.bc_stochastic,
        betas=(c.momentum, c.beta2),
        init=resolved_init(c),
        fused_quant=c.fused_quant,
        **method_settings(c),
    )


def make_run_scheduler(config: RunConfig, optimizer, epochs: int, total_steps: int):
    """The config's learning-rate schedule (`qtrain.train.schedules`): over `total_steps`
    optimizer steps for a per-step schedule, else over `epochs` epochs; it ends at min_lr."""
    return make_scheduler(optimizer, config.schedule, epochs,
                          **_schedule_length(config, total_steps))  # fmt: skip


def redraw_run_schedule(config: RunConfig, scheduler, epochs: int, total_steps: int,
                        redraws: Redraws = ()) -> None:  # fmt: skip
    """The config's schedule in `scheduler` drawn over `epochs` (`total_steps`, then a per-step
    schedule's `redraws`, `qtrain.train.schedules`) from now on."""
    redraw_schedule(scheduler, config.schedule, epochs,
                    **_schedule_length(config, total_steps), redraws=redraws)  # fmt: skip


def _schedule_length(config: RunConfig, total_steps: int) -> dict:
    return dict(total_steps=total_steps, warmup_steps=config.warmup_steps,
                min_ratio=config.min_lr / config.lr)  # fmt: skip
