"""One registry for every data set: each entry builds the same splits and loader protocol.

Every registered name is tested here automatically: what `dataset_info` promises before any
file is read (channels, side, classes) is what the built splits and their loaders deliver.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_data_cifar import write_fake_cifar
from test_data_imagenet import CLASSES, write_tree

from qtrain import data
from qtrain.cli import main
from qtrain.data import registry
from qtrain.data.cifar import SPECS
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer

pytest.importorskip("PIL.Image")

MADE_AT = 12  # the side asked of the sets that are made at the model's size


def build(name: str, root: Path):
    """Splits of `name` from files written under `root` (nothing is downloaded)."""
    if name in SPECS:
        write_fake_cifar(root, SPECS[name])
        return data.load(name, root)
    if name == "imagenet":
        write_tree(root / "train", per_class=2)
        write_tree(root / "val", per_class=1)
    options = {"image_size": MADE_AT} if data.dataset_info(name).image_size is None else {}
    return data.load(name, root, **options)


@pytest.mark.parametrize("name", data.list_datasets("image"))  # text sets: tests/test_data_text.py
def test_every_image_data_set_delivers_what_its_entry_promises(name, tmp_path):
    info = data.dataset_info(name)
    splits = build(name, tmp_path)
    side = info.image_size or MADE_AT
    assert (splits.in_channels, splits.image_size) == (info.in_channels, side)
    if info.num_classes is not None:
        assert splits.num_classes == info.num_classes
    for split in data.SPLITS:
        loader = splits.loader(split, 2, seed=0, device="cpu")
        assert len(loader) >= 1 and loader.batch_size == 2
        x, y = next(iter(loader.epoch(0)))
        assert x.shape == (2, info.in_channels, side, side) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y.min()) <= int(y.max()) < splits.num_classes
        assert len(list(loader.epoch(0, start_batch=len(loader) - 1))) == 1  # resumable
    with pytest.raises(ValueError, match="unknown split 'val'"):
        splits.loader("val", 2, seed=0)


def test_list_datasets_names_every_entry_imagenet_included(capsys):
    assert main(["list", "datasets"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == data.list_datasets() and "imagenet" in listed


def test_an_unknown_data_set_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown data set 'imagnet' \\(did you mean 'imagenet'"):
        data.dataset_info("imagnet")


def test_eval_of_an_imagenet_run_folder(tmp_path, capsys):
    root = tmp_path / "imagenet"
    write_tree(root / "train", per_class=4)
    write_tree(root / "val", per_class=2)
    run = tmp_path / "run"
    argv = [
        *("train", "--model", "tiny_cnn", "--dataset", "imagenet", "--data-dir", root),
        *("--epochs", "1", "--batch-size", "4", "--set", "eval_batch_size=4"),
        *("--set", "device=cpu", "--out", run),
    ]
    assert main([str(a) for a in argv]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dataset"] == "imagenet" and result["images"] == 2 * len(CLASSES)
    assert result["test_error"] == pytest.approx(last["test_error"])


def test_a_newly_registered_data_set_trains_without_any_change_to_the_trainer(
    tmp_path, monkeypatch
):
    def build(root, download):
        return data.make_synthetic(num_train=128, num_test=32, num_classes=3, in_channels=1)

    info = data.DatasetInfo("gray-blobs", "one-channel test images", 1, 8, 3, build)
    monkeypatch.setitem(registry._DATASETS, info.name, info)
    config = RunConfig(
        model="tiny_cnn", dataset="gray-blobs", method="sr-adam", epochs=1, batch_size=32
    )
    trainer = Trainer(config.replace(device="cpu", channels_last=False), tmp_path, log=print)
    metrics = trainer.run()
    assert len(metrics) == 1 and 0 <= metrics[0]["test_error"] <= 100
    saved = load_checkpoint(tmp_path / rundir.CHECKPOINT)["model"]
    assert (saved["num_classes"], saved["in_channels"]) == (3, 1)
