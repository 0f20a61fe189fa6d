"""Checks of a run's settings that need no data and no files, run before either is touched.

Every name (model, method, grid, policy, data set) is looked up in its own registry, and the
model is tried on the data set's image shape (a text model on a window of token ids), so a
typo or a model that cannot take the data ends in one sentence instead of a download, a data
scan or a traceback mid-training.
"""

from __future__ import annotations

import torch

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.models.gpt import GPT_OPTIONS
from qtrain.models.whitening import whitening_layers
from qtrain.train.config import RunConfig
from qtrain.train.loggers import check_logger

# Config keys that size a text model (None: the model's default).
MODEL_OPTIONS = GPT_OPTIONS

# The classes of the probe model: the fit of the input does not depend on the output width.
_PROBE_CLASSES = 10


def check_names(config: RunConfig) -> None:
    """Look every registered name of `config` up (ValueError with a did-you-mean if unknown)."""
    models.model_info(config.model)
    methods.check_settings(config.method, **method_settings(config))
    qdata.dataset_info(config.dataset)
    check_logger(config.log)


def method_settings(config: RunConfig) -> dict:
    """The settings of `config` that `methods.check_settings` checks and `methods.create`
    takes alike (the learning rate, grid, policy, scale, weight decay, Bop's thresholds)."""
    return {
        "lr": config.lr,
        "grid": config.grid,
        "delta": config.delta,
        "policy": config.policy,
        "scale": config.scale,
        "weight_decay": config.weight_decay,
        "bop_gamma": config.bop_gamma,
        "bop_tau": config.bop_tau,
        "bop_sigma": config.bop_sigma,
    }


def image_size(config: RunConfig) -> int:
    """The side of the images the model will see: the data set's, or the model's own when the
    data set is made at any size (synthetic, ImageNet crops)."""
    side = qdata.dataset_info(config.dataset).image_size
    return models.model_info(config.model).input_size if side is None else side


def model_options(config: RunConfig | dict) -> dict:
    """The model size options of `config` that are set (a text model's; None = default)."""
    values = config if isinstance(config, dict) else config.to_dict()
    return {key: values[key] for key in MODEL_OPTIONS if values.get(key) is not None}


def context_length(config: RunConfig | dict) -> int:
    """Tokens per window of a text model: block_size, else the model's default context."""
    values = config if isinstance(config, dict) else config.to_dict()
    return values.get("block_size") or models.model_info(values["model"]).input_size


def is_text(dataset: str) -> bool:
    return qdata.dataset_info(dataset).modality == "text"


def data_options(dataset: str, model: str, config: RunConfig | dict | None = None) -> dict:
    """Builder options: a text data set gets the model's context (and `text_file`), a data set
    of any size the model's image side, any other none."""
    if is_text(dataset):
        values = {"model": model, **(config if isinstance(config, dict) else
                                     config.to_dict() if config else {})}  # fmt: skip
        options = {"block_size": context_length(values)}
        if values.get("text_file"):
            options["text_file"] = values["text_file"]
        return options
    if qdata.dataset_info(dataset).image_size is None:
        return {"image_size": models.model_info(model).input_size}
    return {}


def check_modality(config: RunConfig) -> None:
    """Refuse a text model on images, an image model on text, and text-only keys on images."""
    data = qdata.dataset_info(config.dataset).modality
    model = models.model_info(config.model)
    if model.modality != data:
        suited = models.list_models(data)
        sets = qdata.list_datasets(model.modality)
        noun = {"image": "images", "text": "text"}
        raise ValueError(
            f"model {config.model!r} reads {noun[model.modality]} but data set "
            f"{config.dataset!r} holds {noun[data]}; choose a model for {noun[data]} "
            f"({', '.join(suited)}) or a data set of {noun[model.modality]} ({', '.join(sets)})"
        )
    if data == "text" and config.train_subset is not None:
        raise ValueError(
            f"train_subset applies to image data sets only, not to {config.dataset!r}; leave it "
            "unset (a text run draws random windows of the whole training text)"
        )
    if data == "text":
        for key, off in (("val_images", 0), ("tta", "none"), ("whiten_init", False)):
            if getattr(config, key) != off:
                raise ValueError(
                    f"{key} applies to image data sets only, not to {config.dataset!r}; "
                    f"leave it at {off!r}"
                )
    if data != "text":
        for key in ("text_file", "eval_every"):
            if getattr(config, key) is not None:
                raise ValueError(
                    f"{key} applies to text data sets only, not to {config.dataset!r}; leave it "
                    "unset (image runs evaluate once per epoch)"
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
            raise ValueError(
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
            raise ValueError(
                f"model {config.model!r} takes {wanted}×{wanted} images but data set "
                f"{config.dataset!r} has {side}×{side} images; choose "
                f"{hint or 'another model'} or a data set of {wanted}×{wanted} images"
            ) from None


def _check_text_fit(config: RunConfig, info) -> None:
    """Build the text model on the meta device (sizes and image-only settings are checked)
    and run one window of ids through it."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = _probe_model(config, info)
        model.eval()(torch.zeros(1, context_length(config), dtype=torch.int64))


def _probe_model(config: RunConfig, info):
    """The config's model for data set `info`, built on the current (meta) device."""
    return models.create(
        config.model,
        num_classes=info.num_classes or _PROBE_CLASSES,
        width=config.width,
        in_channels=info.in_channels,
        activations=config.activations,
        options=model_options(config),
    )


def check_config(config: RunConfig) -> None:
    """Every check that needs neither data nor files: values, names, model/data fit."""
    config.validate()
    check_names(config)
    check_modality(config)
    check_fit(config)
