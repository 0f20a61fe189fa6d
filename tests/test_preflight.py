"""Settings are checked before any data is touched: names, values, and the model/data fit."""

from __future__ import annotations

import pytest
import torch

from qtrain.cli import main
from qtrain.data import cifar
from qtrain.train import preflight
from qtrain.train.config import RunConfig


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """An empty data root, downloads enabled, and a downloader that fails the test if called."""

    def download_called(*args, **kwargs):
        pytest.fail("a download started before the settings were checked")

    monkeypatch.setattr(cifar, "download_and_extract", download_called)
    monkeypatch.setenv("QTRAIN_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("QTRAIN_CIFAR10_URL", "http://127.0.0.1:9/unreachable.tar.gz")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--method", "sr-adm"], "unknown method 'sr-adm' (did you mean 'sr-adam'?)"),
        (["--model", "vgg99"], "unknown model 'vgg99'"),
        (["--grid", "quaternary"], "unknown grid 'quaternary'"),
        (["--set", "policy=conv+lin"], "unknown quantization policy 'conv+lin'"),
        (["--set", "schedule=linear"], "schedule must be one of"),
    ],
)
def test_a_typo_is_named_before_cifar_is_downloaded(no_download, option, says, capsys):
    argv = ["train", "--dataset", "cifar10", "--download", *option, "--out", "run"]
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and says in lines[0]
    assert sorted(p.name for p in no_download.iterdir()) == []  # no data root, no run folder


def test_a_model_that_cannot_take_the_data_is_named_with_the_fix(tmp_path, capsys):
    argv = ["train", "--model", "vgg9", "--dataset", "digits", "--out", tmp_path / "run"]
    code, out, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert "model 'vgg9' takes 32×32 images but data set 'digits' has 8×8 images" in lines[0]
    assert "tiny_cnn" in lines[0]  # a model made for the digits
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("model", "side"), [("vgg9", 32), ("tiny_mlp", 8)])
def test_synthetic_images_are_made_at_the_models_input_size(model, side, tmp_path, capsys):
    argv = [
        *("train", "--model", model, "--dataset", "synthetic", "--epochs", "1", "--width"),
        *("0.125", "--batch-size", "64", "--set", "device=cpu", "--set", "train_subset=64"),
        *("--set", "eval_batch_size=128", "--out", tmp_path / "run"),
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert preflight.image_size(RunConfig(model=model, dataset="synthetic")) == side


def test_the_fit_check_draws_nothing_from_the_global_generator():
    before = torch.get_rng_state()
    preflight.check_config(RunConfig(model="resnet56", dataset="digits"))  # any size fits
    with pytest.raises(ValueError, match="takes 32×32 images"):
        preflight.check_config(RunConfig(model="vgg_bc", dataset="digits"))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_quantizing_method_whose_policy_picks_nothing_is_refused():
    from qtrain.train.config import ConfigError, RunConfig
    from qtrain.train.preflight import check_config

    gpt = dict(model="gpt", dataset="shakespeare-char", n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ConfigError, match="policy 'conv' quantizes no parameter of model 'gpt'"):
        check_config(RunConfig(method="bc-adamw", policy="conv", **gpt))
    check_config(RunConfig(method="fp-adamw", policy="conv", **gpt))  # nothing to quantize
    check_config(RunConfig(method="bc-adamw", policy="linear", **gpt))
