"""Checks of a run's settings that need no data and no files, run before either is touched.

Every name (model, method, grid, policy, data set) is looked up in its own registry, and the
model is tried on the data set's image shape (a text model on a window of token ids), with its
activation quantization when `act_bits` is set, so a typo, a model that cannot take the data
or a policy that quantizes no linear layer for act_bits ends in one sentence instead of a
download, a data scan or a traceback mid-training; so does a quantizing method whose policy
picks no parameter of the model (it would train in float). Last, the memory of a training step is
estimated from the model, batch and precision and compared with what the device has
(`qtrain.train.memory`).
"""

from __future__ import annotations

import dataclasses

import torch

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.base.errors import UserError
from qtrain.models.whitening import whitening_layers
from qtrain.train.config import ConfigError, RunConfig, inapplicable
from qtrain.train.loggers import check_logger
from qtrain.train.memory import check_fits
from qtrain.train.parts import with_act_quant
from qtrain.train.settings import context_length, image_size, method_settings, model_options

# The classes of the probe model: the fit of the input does not depend on the output width.
_PROBE_CLASSES = 10


def check_names(config: RunConfig) -> None:
    """Look every registered name of `config` up (ValueError with a did-you-mean if unknown)."""
    models.model_info(config.model)
    methods.check_settings(config.method, **method_settings(config))
    qdata.dataset_info(config.dataset)
    check_logger(config.log)


def check_modality(config: RunConfig) -> None:
    """Refuse a text model on images and an image model on text."""
    data = qdata.dataset_info(config.dataset).modality
    model = models.model_info(config.model)
    if model.modality != data:
        suited = models.list_models(data)
        sets = qdata.list_datasets(model.modality)
        noun = {"image": "images", "text": "text"}
        raise UserError(
            f"model {config.model!r} reads {noun[model.modality]} but data set "
            f"{config.dataset!r} holds {noun[data]}; choose a model for {noun[data]} "
            f"({', '.join(suited)}) or a data set of {noun[model.modality]} ({', '.join(sets)})"
        )


def check_fit(config: RunConfig) -> None:
    """Refuse a model that cannot take the data set's images, naming both and the fix.

    Channels always fit (every model is built with the data's channel count); the side is
    tried with a forward pass of one [1, C, S, S] image on the meta device, which computes
    shapes only: no memory, no arithmetic and no draw from any random generator.
    """
    info = qdata.dataset_info(config.dataset)
    if info.modality == "text":
        _check_text_fit(config, info)
        return
    side = image_size(config)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _probe_model(config, info)
        if config.whiten_init and not whitening_layers(model):
            raise UserError(
                f"whiten_init needs a model with a patch-whitening first layer (speednet), "
                f"and {config.model!r} has none; set whiten_init = false or choose speednet"
            )
        probe = torch.zeros(1, info.in_channels, side, side)
        try:
            model.eval()(probe)
        except RuntimeError:
            wanted = models.model_info(config.model).input_size
            suited = [
                name
                for name in models.list_models("image")
                if models.model_info(name).dataset == config.dataset
                or models.model_info(name).input_size == side
            ]
            hint = f"a model made for {side}×{side} images ({', '.join(suited)})" if suited else ""
            raise UserError(
                f"model {config.model!r} takes {wanted}×{wanted} images but data set "
                f"{config.dataset!r} has {side}×{side} images; choose "
                f"{hint or 'another model'} or a data set of {wanted}×{wanted} images"
            ) from None
        if config.resize_min_side is not None:
            _check_resize(config, model, info.in_channels, side)


def _check_resize(config: RunConfig, model, channels: int, side: int) -> None:
    """Refuse a progressive-resizing side that is not below the data set's or that the model
    cannot take (tried on the meta device, as the full side is)."""
    small = config.resize_min_side
    if small >= side:
        raise UserError(
            f"resize_min_side {small} is not below the {side}×{side} images of data set "
            f"{config.dataset!r}, so nothing would be resized; set it below {side} or unset it"
        )
    try:
        model.eval()(torch.zeros(1, channels, small, small))
    except RuntimeError:
        raise UserError(
            f"model {config.model!r} cannot take {small}×{small} images (its pooling leaves "
            f"nothing at that side); raise resize_min_side towards {side}"
        ) from None


def _check_text_fit(config: RunConfig, info) -> None:
    """Build the text model on the meta device (sizes and image-only settings are checked)
    and run one window of ids through it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _probe_model(config, info)
        model.eval()(torch.zeros(1, context_length(config), dtype=torch.int64))


def _probe_model(config: RunConfig, info):
    """The config's model for data set `info`, built on the current (meta) device, with its
    activation quantization (so a policy that picks no linear layer for act_bits is refused
    here, and the fit and memory checks see the norms and quantizers)."""
    model = models.create(
        config.model,
        num_classes=info.num_classes or _PROBE_CLASSES,
        width=config.width,
        in_channels=info.in_channels,
        activations=config.activations,
        options=model_options(config),
    )
    return with_act_quant(config, model)


def check_quantizes(config: RunConfig) -> None:
    """Refuse a quantizing method whose policy picks no parameter of the model (the policy
    `conv` on a transformer, say): the run would train in float while saying it does not."""
    if methods.parse_method(config.method).mode == "fp":
        return
    info = qdata.dataset_info(config.dataset)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _probe_model(config, info)
    if methods.quantized_parameter_names(model, config.policy):
        return
    picks = [p for p in methods.POLICIES if methods.quantized_parameter_names(model, p)]
    best = "linear" if "linear" in picks else (picks or ["conv"])[0]
    raise ConfigError(
        f"policy {config.policy!r} quantizes no parameter of model {config.model!r}, so "
        f"{config.method} would train it in full precision; use {{policy}}",
        policy=f"policy={best}",
    )


def check_applicable(config: RunConfig) -> None:
    """Refuse a key set on a run it does not apply to (each key's `Scope`, in config.py)."""
    problem = inapplicable(config)
    if problem is not None:
        raise ConfigError(problem)


def check_memory(config: RunConfig, teacher=None, classes: int | None = None) -> None:
    """Refuse a run whose training step cannot fit in the memory its device has available,
    with the estimate and the batch sizes that fit (`qtrain.train.memory.check_fits`).

    When the run distills, the trainer checks again once it has read the teacher: `teacher`
    is the teacher's model on the meta device and `classes` the number it predicts."""
    info = qdata.dataset_info(config.dataset)
    if classes is not None:  # the teacher's: the run's too, or it is refused once data is read
        info = dataclasses.replace(info, num_classes=classes)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _probe_model(config, info)
    check_fits(config, model, teacher)


def check_config(config: RunConfig) -> None:
    """Every check that needs neither data nor files: values, names, keys that apply, the
    model/data fit and the memory of a step."""
    config.validate()
    check_modality(config)
    check_applicable(config)
    check_names(config)
    check_fit(config)
    check_quantizes(config)
    check_memory(config)
