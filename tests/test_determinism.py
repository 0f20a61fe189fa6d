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

from qtrain.cli import main
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig, tomllib  # tomli on Python 3.10

TIMING_KEYS = {"seconds", "images_per_second"}
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
