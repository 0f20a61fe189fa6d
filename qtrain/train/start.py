"""Quantization-aware training from float: a run that starts from trained weights (`init_from`).

`init_from = PATH` names a trained model (`qtrain.train.sources`: a run folder or checkpoint,
a packed file, a Hugging Face folder) of the run's own architecture. Its weights (those its
run reported) replace the model's random initialisation before the method's optimizer is
built, so the method then starts from them as it starts from an initialisation:

| method            | init = "auto" with init_from                                       |
|-------------------|--------------------------------------------------------------------|
| fp-*              | w = the float weights; training continues from them                |
| bc-*              | w_r = the float weights (in BC's clip box, as after every step),   |
|                   | w_b = Q(w_r) with the run's scale (fixed, or measured from w_r)    |
| sr-*, r-*, bop-*, | w_b = s·Q_d(w/s): the float weights rounded to the nearest level of |
| bop2-*            | the scaled grid (s fixed: none or he), not Rademacher signs        |

An explicit `init` (rademacher, round, keep) is honoured as it is without init_from
(`qtrain.methods.create`). Only weights are taken: the run has its own optimizer state,
schedule and random streams. Full-precision parameters (embeddings, norms, the head) start
at the float values as well; tensors the run's model adds to the architecture (the input
norms of `act_bits`) keep their own initialisation.

Same architecture: the starting model must have the run's model name, sizes (every option
but dropout, which changes no weight), width, input channels and number of classes, and a
character model the run's vocabulary; the first difference is refused in one line. Binary
activations and `act_bits` may differ: they change how the weights are used, not which.

Identity: the weights are read when a run starts, never when it resumes (its checkpoint holds
them). Every checkpoint records the start's SHA-256 (`sources.weights_sha256`) under
"init_from". A resume whose init_from names the recorded path is not read again; one that
names another path (the file moved) is read and must have the recorded SHA-256. Setting
init_from on a run that had none, or dropping it, is an identity change (`config`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from qtrain import methods
from qtrain.base.errors import UserError
from qtrain.train.config import RunConfig
from qtrain.train.sources import Source, load_weights, read_source, tokens_difference

KEY = "init_from"
# options that change no weight, so a start may differ in them: dropout, the hf model's
# training window
_FREE_OPTIONS = ("dropout",)
_FREE_HF_OPTIONS = ("block_size",)


def resolved_init(config: RunConfig) -> str:
    """The `init` of `qtrain.methods.create` for `config`: with init_from, "auto" rounds the
    start onto the grid for the methods without latent weights (SR, R, Bop, Bop2)."""
    mode = methods.parse_method(config.method).mode
    if config.init == "auto" and config.init_from is not None and mode not in ("fp", "bc"):
        return "round"
    return config.init


def start_from(config: RunConfig, model: nn.Module, splits) -> dict:
    """Load the weights `config.init_from` names into `model` (the run's freshly built model
    for `splits`) after checking the architecture; returns the record the run keeps."""
    source = read_source(config.init_from, KEY)
    difference = architecture_difference(source.spec, run_spec(config, model, splits), splits)
    if difference is not None:
        raise UserError(
            f"{KEY} {source.given} holds {difference}; start from a model of this run's "
            "architecture or change the run's settings to match it"
        )
    load_weights(model, source, KEY)
    return source.record()


def run_spec(config: RunConfig, model: nn.Module, splits) -> dict:
    """The description of the run's model, as a checkpoint's model record has it (a text
    model's options: the fields of its `config`)."""
    sizes = getattr(model, "config", None)
    spec = {
        "name": config.model,
        "num_classes": splits.num_classes,
        "width": config.width,
        "in_channels": splits.in_channels,
        "options": dataclasses.asdict(sizes) if dataclasses.is_dataclass(sizes) else {},
    }
    return spec


def architecture_difference(start: dict, run: dict, splits=None) -> str | None:
    """What the starting model `start` has that the run's `run` has not, in words (None when
    they are the same architecture, module docstring); with the run's text `splits`, also
    what its token ids mean (`sources.tokens_difference`)."""
    if start.get("name") != run["name"]:
        return f"model {start.get('name')!r}, not this run's {run['name']!r}"
    for key in ("width", "in_channels"):
        if key in start and start[key] != run[key]:
            return f"a model with {key}={start[key]!r}, not this run's {key}={run[key]!r}"
    ours = run["options"]
    free = _FREE_OPTIONS + (_FREE_HF_OPTIONS if run["name"] == "hf" else ())
    for key, value in sorted((start.get("options") or {}).items()):
        if key in ours and key not in free and value != ours[key]:
            return _option_difference(key, value, ours[key])
    text = hasattr(splits, "vocab")
    if "num_classes" in start and start["num_classes"] != run["num_classes"]:
        what = "tokens" if text else "classes"
        return f"a model of {start.get('num_classes')} {what}, not this run's {run['num_classes']}"
    tokens = tokens_difference(start, splits) if text else None
    if tokens is not None:
        return f"a model of the {tokens[0]}, not this run's {tokens[1]}"
    return None


def _option_difference(key: str, value, ours) -> str:
    """An option that differs, in words; of a dict option (a config.json), its first key."""
    if isinstance(value, dict) and isinstance(ours, dict):
        inner = sorted(str(k) for k in set(value) | set(ours) if value.get(k) != ours.get(k))[0]
        return (
            f"a model whose {key} has {inner}={value.get(inner)!r}, not this run's "
            f"{ours.get(inner)!r}"
        )
    return f"a model with {key}={value!r}, not this run's {key}={ours!r}"


def check_same_start(record: dict, config: RunConfig, run_dir) -> dict | None:
    """On resume: the run's record of its start, after checking that `config.init_from` names
    it (module docstring: read again only when it names another path); None without one."""
    saved = record.get(KEY)
    if config.init_from is None or not isinstance(saved, dict):
        return saved if isinstance(saved, dict) else None
    if Path(config.init_from).expanduser().resolve() == Path(str(saved.get("path"))):
        return saved
    source: Source = read_source(config.init_from, KEY)
    if source.sha256 != saved.get("sha256"):
        raise UserError(
            f"cannot resume: {KEY} {source.given} is not the model the run in {run_dir} started "
            f"from (SHA-256 {str(saved.get('sha256'))[:12]}…); resume with {{init_from}} (or "
            "where that model is now) or start a new {out} folder",
            init_from=f"{KEY}={saved.get('path')}",
            out="run",
        )
    return saved
