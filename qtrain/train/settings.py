"""What a run's config means for each part: the settings the data builder, the model and the
method take, derived from the `RunConfig` and the registries (no list of keys is kept here).

Preflight (`qtrain.train.preflight`) validates a config; these helpers only translate one
into the keyword arguments of `qtrain.data.load`, `qtrain.models.create` and
`qtrain.methods.create`, for training, evaluation and export alike.
"""

from __future__ import annotations

import inspect

from qtrain import data as qdata
from qtrain import methods, models
from qtrain.data.tokens import TokenizerSpec
from qtrain.models.hf import read_hf_folder, vocab_size_of
from qtrain.train.config import RunConfig

# The keyword settings `methods.check_settings` checks and `methods.create` takes alike.
_METHOD_SETTINGS = tuple(
    name
    for name, p in inspect.signature(methods.check_settings).parameters.items()
    if p.kind is not inspect.Parameter.VAR_KEYWORD and name != "name"
)


def method_settings(config: RunConfig) -> dict:
    """The settings of `config` that `methods.check_settings` and `methods.create` take (the
    learning rate, grid, policy, scale, weight decay, Bop's thresholds)."""
    return {name: getattr(config, name) for name in _METHOD_SETTINGS}


def is_text(dataset: str) -> bool:
    return qdata.dataset_info(dataset).modality == "text"


def image_size(config: RunConfig) -> int:
    """The side of the images the model will see: the data set's, or the model's own when the
    data set is made at any size (synthetic, ImageNet crops)."""
    side = qdata.dataset_info(config.dataset).image_size
    return models.model_info(config.model).input_size if side is None else side


def model_options(config: RunConfig | dict) -> dict:
    """The options of `config` that its model takes (`ModelInfo.options`) and that are set
    (None = the model's default)."""
    values = config if isinstance(config, dict) else config.to_dict()
    options = models.model_info(values["model"]).options
    return {key: values[key] for key in options if values.get(key) is not None}


def context_length(config: RunConfig | dict) -> int:
    """Tokens per window of a text model: block_size, else the model's default context (for
    the hf model: min(256, its config's), `ModelInfo.default_context`)."""
    values = config if isinstance(config, dict) else config.to_dict()
    info = models.model_info(values["model"])
    return values.get("block_size") or info.default_context(model_options(values))


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


def tokens_options(config: RunConfig) -> dict:
    """How the hf model's text becomes token ids, as data options: through its folder's
    tokenizer (``tokenizer``, `qtrain.data.tokens.TokenizerSpec`) or by character, every id
    below the model's vocab_size (``max_vocab``); {} for a model without `hf_path`."""
    if config.hf_path is None:
        return {}
    folder = read_hf_folder(config.hf_path)
    options = {"max_vocab": vocab_size_of(folder.config)}
    if folder.tokenizer is not None:
        options["tokenizer"] = TokenizerSpec.from_transformers(folder.tokenizer)
    return options
