"""Checkpoints: atomic writes and safe, validated loads (rebuilding the model: `rebuild`).

A checkpoint is one `torch.save`d dict that `torch.load(weights_only=True)` can read (tensors,
dicts, lists, strings and numbers only, so loading never runs code):

    format          "qtrain-checkpoint"
    format_version  1
    qtrain_version  package version that wrote it
    config          the resolved run configuration (a flat dict of primitives)
    model           {"name", "num_classes", "width", "in_channels", "activations", "options"}:
                    enough to rebuild it (options: a text model's size, e.g. the GPT's
                    n_layer, or the hf model's {"hf_config", "block_size"}; a text model also
                    has "vocab", the character of each token id, or "tokenizer" (a text read
                    through one: {"class", "vocab_size", "vocab_sha256", "json"});
                    a run with act_bits has "act_quant", `qtrain.models.act_quant`'s
                    description {"bits", "norm", "modules"})
    data            text runs only: {"sha256"} of the training text (checked on resume)
    init_from       runs with init_from only: {"path", "kind", "model", "sha256"} of the model
                    it started from (`qtrain.train.start`; checked on resume)
    distill_from    runs with distill_from only: the same of its teacher
                    (`qtrain.train.distill`; checked on resume)
    method          {"name", "grid": Grid.to_dict(), "policy"}
    quantized       names of the parameters that live on the grid
    model_state     model.state_dict()
    training        optimizer / scheduler / progress state (absent in exported weights),
                    with the states of torch's default generators (`state.generator_states`):
                    "torch_rng" (CPU) and "cuda_rng" (the run's CUDA device; None on the CPU,
                    absent in checkpoints written before it was saved)

Writes go to a temporary file in the same folder, are fsync'ed, then atomically renamed over
the target, so a crash at any moment leaves either the old or the new checkpoint, never a
torn one. A temporary file left by a killed write is removed by the next successful write of
the same target (one writer per file, as in a run folder). Loading checks every member's
CRC-32 first, because `torch.load` does not and would return silently damaged tensors.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path

import torch

import qtrain
from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_bytes

FORMAT = "qtrain-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable, corrupt or of another kind."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically save a checkpoint dict (adds the format header)."""
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qtrain_version": qtrain.__version__,
    }
    record.update(payload)
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint without executing code (`weights_only=True`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        candidate = path / "checkpoint.pt"
        if not candidate.exists():
            raise CheckpointError(
                f"{path} is a folder without checkpoint.pt; pass a run folder or a .pt file"
            )
        path = candidate
    damaged = _first_damaged_member(path)
    if damaged is not None:
        raise CheckpointError(
            f"{path} is corrupt: its part {damaged!r} fails the CRC-32 check, so the file was "
            "damaged after it was written; use another copy or train again"
        )
    try:
        with warnings.catch_warnings():  # a damaged pickle's odd protocol is refused below
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as e:
        raise CheckpointError(
            f"{path} cannot be read ({e.strerror}); check its permissions"
        ) from None
    # torch.load reports a foreign or damaged file through many exception types
    except (
        pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, KeyError,
        ValueError, TypeError, AttributeError, IndexError,
    ) as e:  # fmt: skip
        message = str(e).strip()
        refused = re.search(r"unsupported GLOBAL ([\w.]+)", message)
        if refused:
            raise CheckpointError(
                f"{path} refers to {refused[1]}, which a checkpoint never contains; it was "
                "refused without running any code, do not use this file"
            ) from None
        reason = (  # its first sentence: miniz's message goes on about reporting a bug
            message.splitlines()[0].split(". ")[0]
            if isinstance(e, RuntimeError) and message
            else ("not a PyTorch checkpoint file")
        )
        raise CheckpointError(
            f"{path} is not a readable qtrain checkpoint ({reason[:160]}); "
            "it may be truncated or not a checkpoint at all"
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a qtrain checkpoint; pass a checkpoint.pt "
            "written by `qtrain train`"
        )
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {record.get('format_version')!r}, this qtrain reads "
            f"format {FORMAT_VERSION}; load it with the qtrain version that wrote it "
            f"({record.get('qtrain_version', 'unknown')})"
        )
    for key in ("model", "method", "quantized", "model_state"):
        if key not in record:
            raise CheckpointError(f"{path} lacks the {key!r} entry; the file is damaged")
    _check_entries(path, record)
    return record


def _check_entries(path: Path, record: dict) -> None:
    """CheckpointError for an entry of the wrong type (a file edited and saved again)."""
    kinds = {"model": dict, "method": dict, "quantized": list, "model_state": dict,
             "config": dict, "training": dict, "data": dict, "init_from": dict,
             "distill_from": dict}  # fmt: skip
    for key, kind in kinds.items():
        if key in record and not isinstance(record[key], kind):
            problem = f"its {key!r} entry is not a {kind.__name__}"
            break
    else:
        if not all(isinstance(record[key].get("name"), str) for key in ("model", "method")):
            problem = "its model or method has no name"
        elif not all(isinstance(name, str) for name in record["quantized"]):
            problem = "its list of quantized parameters holds more than names"
        elif not all(isinstance(t, torch.Tensor) for t in record["model_state"].values()):
            problem = "its model_state holds more than tensors"
        else:
            problem = config_problem(record.get("config") or {})
            if problem is None:
                return
    raise CheckpointError(f"{path} is damaged or was edited: {problem}; use another copy")


def config_problem(config: dict) -> str | None:
    """What is wrong with a saved config dict (a known key with a value of another type), or
    None. Keys this version does not know are left alone: a later version may write them."""
    from qtrain.train.config import ConfigError, coerce, keys

    for key in set(config) & set(keys()):
        try:
            coerce(key, config[key])
        except ConfigError as e:
            return str(e)
    return None


def _first_damaged_member(path: Path) -> str | None:
    """Name of the first zip member whose data does not match its stored CRC-32, else None.

    Files that are not zip archives (or not readable) pass here; `torch.load` reports them.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if member.flag_bits & 0x1:  # "encrypted": torch never writes that, testzip raises
                    return member.filename
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, zlib.error):
        return None
