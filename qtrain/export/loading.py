"""Loading a saved model of either kind, and the storage summary of a file or a model name.

    load(path)                            checkpoint, run folder or packed file → nn.Module
                                          (the weights the run reported: its EMA if kept)
    load_any_model(path)                  the same → (model, record)
    summary_of(model, record)             per-layer storage of a loaded model
    summary_of_target(target, **options)  the same for a path, or for a registered model name

A checkpoint is a zip archive (`torch.save`) and a packed file a safetensors file; they are
told apart by content, and any other file is refused before it reaches an unpickler.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.names import did_you_mean, unknown_name
from qtrain.export.packed import is_packed_file, read_packed
from qtrain.export.summary import Summary, summarize
from qtrain.quant import Grid, parse_grid
from qtrain.train.checkpoint import CheckpointError, load_checkpoint
from qtrain.train.rebuild import WEIGHT_CHOICES, build_model

MODEL_OPTIONS = {"grid": "binary", "policy": "conv", "scale": "none", "width": 1.0,
                 "num_classes": 10, "in_channels": 3, "activations": "float"}  # fmt: skip


def load(path: str | Path) -> nn.Module:
    """The trained model of a checkpoint, run folder or packed file, in eval mode.

    A plain `nn.Module` of the registered architecture with ordinary parameters (no optimizer,
    no qtrain state) holding exactly the deployed weights: w_b for quantized parameters (on the
    grid, scaled where trained with scales), the float parameters and BatchNorm statistics as
    saved. So its outputs are bit-identical to the training model's in eval mode on the same
    device and dtype. The model is on the CPU in the saved dtype; move it with `.to()`.
    """
    model, _ = load_any_model(path)
    return model.eval()


def load_any_model(path: str | Path, weights: str = "reported") -> tuple[nn.Module, dict]:
    """(model in eval mode, record) from a checkpoint, a run folder or a packed file.

    `weights` (`qtrain.train.rebuild.build_model`): "reported", the weights the run's
    numbers were measured with (its weight average when it kept one), or "live". A packed
    file holds the reported weights only.
    """
    if weights not in WEIGHT_CHOICES:
        raise unknown_name("weights", weights, WEIGHT_CHOICES)
    path = Path(path)
    if is_packed_file(path):
        if weights != "reported":
            raise UserError(
                f"{path} is a packed file, which holds only the weights its run reported; "
                "pass the run folder or its checkpoint.pt for the live weights"
            )
        return read_packed(path)
    if path.is_file() and not _is_zip(path):
        raise CheckpointError(
            f"{path} is neither a qtrain checkpoint nor a packed model file (or is truncated); "
            "pass a checkpoint.pt written by `qtrain train` or a file from `qtrain export`"
        )
    record = load_checkpoint(path)
    return build_model(record, weights), record


def _is_zip(path: Path) -> bool:
    """zipfile.is_zipfile, which lets some damaged end records raise BadZipFile."""
    try:
        return zipfile.is_zipfile(path)
    except zipfile.BadZipFile:
        return False


def summary_of(model: nn.Module, record: dict) -> Summary:
    """Summary of a loaded model: its record names the quantized parameters and the grid, and
    its weights say which carry scales, and how many."""
    grid = Grid.from_dict(record["method"]["grid"])
    return summarize(model, record["quantized"], grid, scale=None)


def summary_of_target(target: str, **model_options) -> Summary:
    """Summary of a checkpoint or packed file, or of a registered model name.

    For a model name, `model_options` (grid, policy, scale, width, num_classes, in_channels,
    activations; the defaults are in MODEL_OPTIONS) choose the network, which parameters count
    as packed and which scales they carry (those of the scale the model would train with).
    """
    from qtrain import methods, models

    if Path(target).exists():
        if model_options:
            option = next(iter(model_options))
            raise UserError(
                "{" + option + "} applies to model names only; "
                f"{target} carries its own model and grid",
                **{option: option},
            )
        return summary_of(*load_any_model(target))
    if target not in models.list_models():
        raise FileNotFoundError(
            f"{target} is neither an existing file nor a registered model"
            f"{did_you_mean(target, models.list_models())}; pass a checkpoint, a packed file or "
            f"one of {', '.join(models.list_models())}"
        )
    options = {**MODEL_OPTIONS, **model_options}
    if options["scale"] not in methods.SCALES:
        raise unknown_name("scale", options["scale"], methods.SCALES)
    model = models.create(
        target,
        options["num_classes"],
        options["width"],
        options["in_channels"],
        activations=options["activations"],
    )
    names = methods.quantized_parameter_names(model, options["policy"])
    return summarize(model, names, parse_grid(options["grid"]), scale=options["scale"])
