"""Checks of a run's settings that need no data and no files, run before either is touched.

Every name (model, method, grid, policy, data set) is looked up in its own registry, and the
model is tried on the data set's image shape, so a typo or a model that cannot take the data
ends in one sentence instead of a download, a data scan or a traceback mid-training.
"""

from __future__ import annotations

import torch

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.train.config import RunConfig
from qtrain.train.loggers import check_logger

# The classes of the probe model: the fit of the input does not depend on the output width.
_PROBE_CLASSES = 10


def check_names(config: RunConfig) -> None:
    """Look every registered name of `config` up (ValueError with a did-you-mean if unknown)."""
    models.model_info(config.model)
    methods.check_settings(
        config.method,
        config.lr,
        grid=config.grid,
        delta=config.delta,
        policy=config.policy,
        scale=config.scale,
        weight_decay=config.weight_decay,
        bop_gamma=config.bop_gamma,
        bop_tau=config.bop_tau,
        bop_sigma=config.bop_sigma,
    )
    qdata.dataset_info(config.dataset)
    check_logger(config.log)


def image_size(config: RunConfig) -> int:
    """The side of the images the model will see: the data set's, or the model's own when the
    data set is made at any size (synthetic, ImageNet crops)."""
    side = qdata.dataset_info(config.dataset).image_size
    return models.model_info(config.model).input_size if side is None else side


def data_options(dataset: str, model: str) -> dict:
    """Builder options that make a data set of any size follow the model (else none)."""
    if qdata.dataset_info(dataset).image_size is None:
        return {"image_size": models.model_info(model).input_size}
    return {}


def check_fit(config: RunConfig) -> None:
    """Refuse a model that cannot take the data set's images, naming both and the fix.

    Channels always fit (every model is built with the data's channel count); the side is
    tried with a forward pass of one [1, C, S, S] image on the meta device, which computes
    shapes only: no memory, no arithmetic and no draw from any random generator.
    """
    info = qdata.dataset_info(config.dataset)
    side = image_size(config)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = models.create(
            config.model,
            num_classes=info.num_classes or _PROBE_CLASSES,
            width=config.width,
            in_channels=info.in_channels,
            activations=config.activations,
        )
        probe = torch.zeros(1, info.in_channels, side, side)
        try:
            model.eval()(probe)
        except RuntimeError:
            wanted = models.model_info(config.model).input_size
            suited = [
                name
                for name in models.list_models()
                if models.model_info(name).dataset == config.dataset
                or models.model_info(name).input_size == side
            ]
            hint = f"a model made for {side}×{side} images ({', '.join(suited)})" if suited else ""
            raise ValueError(
                f"model {config.model!r} takes {wanted}×{wanted} images but data set "
                f"{config.dataset!r} has {side}×{side} images; choose "
                f"{hint or 'another model'} or a data set of {wanted}×{wanted} images"
            ) from None


def check_config(config: RunConfig) -> None:
    """Every check that needs neither data nor files: values, names, model/data fit."""
    config.validate()
    check_names(config)
    check_fit(config)
