"""Typed configuration: presets parse, overrides are typed, bad keys and values are refused."""

from __future__ import annotations

import pytest

from qtrain import data, methods, models
from qtrain.train.config import (
    ConfigError,
    RunConfig,
    from_dict,
    list_presets,
    load_toml,
    parse_override,
    to_toml,
)


@pytest.mark.parametrize("name", list_presets())
def test_every_shipped_preset_is_a_valid_config_of_known_names(name):
    config = from_dict(load_toml(name))
    assert config.model in models.list_models()
    assert config.method in methods.list_methods()
    assert config.dataset in [*data.list_datasets(), "imagenet"]


def test_toml_round_trip_keeps_every_value(tmp_path):
    config = RunConfig(model="resnet56", lr=0.003, weight_decay=1e-5, train_subset=1000)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert from_dict(load_toml(path)) == config


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr=0.1", ("lr", 0.1)),
        ("epochs=12", ("epochs", 12)),
        ("width=1", ("width", 1.0)),
        ("method=sr-adam", ("method", "sr-adam")),
        ("channels_last=false", ("channels_last", False)),
        ("train_subset=none", ("train_subset", None)),
        ("tta=none", ("tta", "none")),  # a string key keeps the word
        ("scale=None", ("scale", "None")),
        ('data_dir="/data/cifar"', ("data_dir", "/data/cifar")),
    ],
)
def test_overrides_are_read_as_typed_values(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize(
    "values, message",
    [
        ({"modle": "vgg9"}, "did you mean 'model'"),
        ({"epochs": 1.5}, "epochs"),
        ({"epochs": True}, "epochs"),
        ({"lr": "fast"}, "lr"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"momentum": 1.0}, "momentum"),
        ({"amp": "fp8"}, "amp must be"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(values)
