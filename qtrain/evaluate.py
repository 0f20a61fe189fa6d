"""Test error of a saved model: a checkpoint, a run folder, or a packed export.

An image run that held out a validation split (`val_images` > 0) can be evaluated on it
instead (`split="val"`): the same images its records' val_error was measured on, drawn again
from the run's seed (`qtrain.data.holdout`), so settings can be compared on images no run
trained on, for weights or test-time augmentation other than the run's own.

A language model is evaluated as in training: on its text's fixed validation windows
(`eval_batches` × `batch_size` of the run's config), reporting the loss in nats per token and
bits per character (loss / ln 2) besides the next-character error. A run of the hf model that
read its text through its folder's tokenizer is evaluated through the tokenizer its record
stores (the loss is then per token), never through the folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qtrain import data as qdata
from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name
from qtrain.data.holdout import hold_out, validation_loader
from qtrain.data.tokens import TokenizerSpec
from qtrain.export.loading import load_any_model
from qtrain.train.config import EVAL_BATCH, RunConfig
from qtrain.train.devices import slow_bf16_note
from qtrain.train.evaluation import evaluate
from qtrain.train.settings import data_options, is_text
from qtrain.train.tta import check_tta

SPLITS = ("test", "val")


def eval_loader(
    record: dict,
    data_dir: str | None = None,
    batch_size: int = EVAL_BATCH,
    device="cpu",
    split: str = "test",
):
    """(loader, number of images) of the split a saved model was trained against: the whole
    test set of an image data set (or with `split="val"` the images its run held out), the
    fixed validation windows of a text."""
    config = record.get("config") or {}
    dataset = config.get("dataset")
    if not dataset:
        raise UserError("the file does not name the data set it was trained on")
    name = record["model"]["name"]
    text = is_text(dataset)
    if text:  # the model's own context, whatever the config's defaults are now
        config = {**config, "block_size": record["model"]["options"]["block_size"]}
    options = data_options(dataset, name, config)
    if record["model"].get("tokenizer"):  # the text is read as the run read it, by its tokenizer
        options["tokenizer"] = TokenizerSpec.from_record(record["model"]["tokenizer"])
    splits = qdata.load(dataset, data_dir or config.get("data_dir"), download=False, **options)
    if text:
        loader = splits.loader("test", config["batch_size"], seed=0, device=device,
                               batches=config.get("eval_batches", 20))  # fmt: skip
        return loader, len(splits.test)
    # in the memory layout the run trained and evaluated in: the same kernels, speed
    layout = dict(seed=0, device=device, channels_last=_channels_last(config))
    if split == "val":
        held_out = hold_out(splits, config["val_images"], config.get("seed", 0))[1]
        return validation_loader(splits, held_out, batch_size, **layout), len(held_out)
    return splits.loader("test", batch_size, **layout), len(splits.test)


def _check_split(split: str, config: dict) -> None:
    """Refuse a split the saved run cannot be evaluated on, naming the one it can."""
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    if split == "test":
        return
    if is_text(config["dataset"]):
        raise UserError(
            "a language model is evaluated on its text's validation windows, which is what "
            "the default split does; leave out --split"
        )
    if not config.get("val_images"):
        raise UserError(
            "this run held out no validation images (val_images = 0), so there is no "
            "validation split to evaluate; leave out --split to evaluate the test split"
        )


def _channels_last(config: dict) -> bool:
    """Whether an image run kept its images and model channels-last (its config's default
    then, for a record that predates the setting)."""
    return bool(config.get("channels_last", RunConfig.channels_last))


def evaluate_file(
    path: str | Path,
    data_dir: str | None = None,
    batch_size: int = EVAL_BATCH,
    device: str = "cpu",
    *,
    tta: str | None = None,
    weights: str = "reported",
    split: str = "test",
    log=None,
) -> dict:
    """Evaluate a checkpoint, run folder or packed file on its data set's test split, or on
    the validation split its run held out (`split="val"`: keys val_error and val_loss).

    By default as the run evaluated itself: the reported weights (its weight average when it
    kept one), its test-time augmentation and its autocast setting, so an image run's test
    (or validation) error here equals the one in its last record. `tta` and
    `weights="live"` override. `log`, when given, gets a one-line note before a bf16 run is
    evaluated on a CPU that emulates bf16 (`slow_bf16_note`).
    """
    if tta is not None:
        check_tta(tta)
    model, record = load_any_model(path, weights)
    config = record.get("config") or {}
    if not config.get("dataset"):
        raise UserError(
            f"{path} does not name the data set it was trained on; it cannot be evaluated"
        )
    _check_split(split, config)
    tta = config.get("tta", "none") if tta is None else tta
    if tta != "none" and is_text(config["dataset"]):
        raise UserError(
            f"test-time augmentation {tta!r} applies to images; a text model takes {{tta}}",
            tta="tta=none",
        )
    loader, images = eval_loader(record, data_dir, batch_size, device, split)
    torch_device = torch.device(device)
    model = model.to(torch_device)
    if not is_text(config["dataset"]) and _channels_last(config):
        model = model.to(memory_format=torch.channels_last)
    amp = config.get("amp", "off")
    note = slow_bf16_note(torch_device, amp, kept="is evaluated")
    if note and log is not None:
        log(note)
    result = evaluate(model, loader, torch_device, amp, tta=tta)
    dataset = record["config"]["dataset"]
    summary = {
        "model": record["model"]["name"],
        "method": record["method"]["name"],
        "dataset": dataset,
        "split": split,
        "images": images,
        f"{split}_error": result["error"],
        f"{split}_loss": result["loss"],
        "tta": tta,
        "weights": weights,
    }
    if is_text(dataset):
        tokens = len(loader) * loader.batch_size * loader.block_size
        summary.update(images=tokens, val_loss=result["loss"], val_bpc=result["loss"] / math.log(2))
    return summary
