"""Determinism: a seed fixes a CPU run completely, and a run folder is enough to repeat it.

Stochastic rounding, the shuffle and the augmentation all draw from seeded generators, so two
runs with one seed must agree bit for bit; the folder's config.toml, fed back with --config,
must reproduce the run, and meta.json must name the code that produced it.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qtrain import data as qdata
from qtrain import models
from qtrain.base.streams import stream_generator, stream_seed
from qtrain.cli import main
from qtrain.data.loader import generator_for
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig, tomllib  # tomli on Python 3.10
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.trainer import Trainer

TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in
# SR draws its rounding from a generator; augmentation adds crop and flip draws.
ARGV = [
    *("train", "--model", "tiny_mlp", "--dataset", "synthetic", "--method", "sr-adam"),
    *("--epochs", "2", "--batch-size", "64", "--set", "device=cpu", "--set", "augment=true"),
    *("--set", "channels_last=false", "--set", "threads=1"),
]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(capsys, *extra) -> None:
    assert main([*map(str, ARGV), *map(str, extra)]) == 0
    capsys.readouterr()


def result(run_dir) -> tuple[list[dict], dict]:
    metrics = [
        {k: v for k, v in m.items() if k not in TIMING_KEYS} for m in rundir.read_metrics(run_dir)
    ]
    return metrics, load_checkpoint(run_dir)["model_state"]


def assert_same(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_one_seed_gives_identical_runs_and_another_seed_does_not(tmp_path, capsys):
    train(capsys, "--out", tmp_path / "a")
    train(capsys, "--out", tmp_path / "b")
    train(capsys, "--out", tmp_path / "c", "--seed", "1")
    assert_same(result(tmp_path / "a"), result(tmp_path / "b"))
    assert result(tmp_path / "a")[0] != result(tmp_path / "c")[0]


def test_the_run_folder_alone_repeats_the_run(tmp_path, capsys):
    train(capsys, "--out", tmp_path / "original", "--seed", "7")
    config = tmp_path / "original" / rundir.CONFIG
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert_same(result(tmp_path / "original"), result(tmp_path / "again"))

    # Every setting is written (None means "the default", which TOML cannot spell).
    written = tomllib.loads(config.read_text())
    settings = {f.name for f in dataclasses.fields(RunConfig)}
    unset = {k for k, v in load_checkpoint(tmp_path / "original")["config"].items() if v is None}
    assert written.keys() == settings - unset and written["seed"] == 7
    meta = json.loads((tmp_path / "original" / rundir.META).read_text())
    for key in ("qtrain_version", "git_revision", "torch_version", "python_version", "command"):
        assert meta[key], key
    assert meta["torch_threads"] == 1  # the count the numbers depend on


# -- every random stream of a run comes from (seed, stream name) -----------------------------


def stream_config(**changes) -> RunConfig:
    base = dict(model="tiny_mlp", dataset="synthetic", method="fp-adam", batch_size=64, seed=5)
    return RunConfig(**{**base, "device": "cpu", "channels_last": False, **changes})


def test_model_initialisation_draws_from_the_init_stream(tmp_path):
    trainer = Trainer(stream_config(), tmp_path / "run", log=lambda *a: None)
    torch.manual_seed(stream_seed(5, "init"))
    expected = models.create("tiny_mlp", num_classes=4, width=1.0, in_channels=3)
    for (name, got), want in zip(
        trainer.model.state_dict().items(), expected.state_dict().values()
    ):
        assert torch.equal(got, want), name
    # The init of seed 5 is not the init a `manual_seed(seed + k)` scheme would give any seed.
    torch.manual_seed(5)
    plain = models.create("tiny_mlp", num_classes=4, width=1.0, in_channels=3)
    assert not torch.equal(next(plain.parameters()), next(trainer.model.parameters()))


def test_train_subset_and_data_order_draw_from_their_own_streams(tmp_path):
    trainer = Trainer(stream_config(train_subset=128), tmp_path / "run", log=lambda *a: None)
    full = qdata.load("synthetic", image_size=8)
    keep = torch.randperm(512, generator=stream_generator(5, "subset"))[:128]
    assert torch.equal(trainer.splits.train.labels, full.train.labels[keep])
    order = torch.randperm(128, generator=generator_for(stream_seed(5, "data-order"), 0))
    labels = torch.cat([y for _, y in trainer.train_loader.epoch(0)])
    assert torch.equal(labels, trainer.splits.train.labels[order])
