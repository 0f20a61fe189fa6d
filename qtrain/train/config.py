"""Typed run configuration: one flat dataclass, loaded from TOML, overridable from the CLI.

Every run directory and checkpoint stores the resolved configuration, so a run can be
repeated from its folder alone. Unknown keys and values of the wrong type are rejected with
one sentence that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from qtrain.base.names import did_you_mean
from qtrain.train.ema import check_ema_decay
from qtrain.train.losses import check_label_smoothing
from qtrain.train.tta import check_tta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULES = ("step", "cosine", "constant", "warmup-cosine", "warmup-linear")
AMP_MODES = ("auto", "off", "bf16")
# No method learns with steps this large, and near 1e38 Adam's step size overflows float32.
MAX_LR = 1e6


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


IDENTITY = "identity"


def _identity(default, when=None):
    """A field that defines the run: resuming with another value is refused (see RunConfig).

    ``when(config)`` limits that to the configs for which the key changes the numbers.
    """
    return field(default=default, metadata={IDENTITY: when or (lambda config: True)})


@dataclass
class RunConfig:
    """Everything that determines a training run (docs/paper.md §2 defaults).

    Fields made with `_identity` define the run's identity: the numbers it computes. The rule:
    a key is part of the identity when it changes what is computed, including the precision
    of the arithmetic (the model, the data and its order, the method and every
    hyper-parameter, the seed, the number of epochs unless the schedule is constant (step
    and cosine schedules are drawn over all epochs; a constant one lets a run be extended), and
    ``amp`` because bf16 activations keep only 8 bits of mantissa). A key that only changes
    where or in which order the same arithmetic runs (device, threads, ``channels_last``,
    ``compile``), how fast or how often things happen (eval batch size, checkpoint cadence)
    or where inputs are found (``data_dir``, ``download``) may change on resume; such a change
    can break bit-exactness, which holds only for the same device, threads and memory layout.
    ``amp = "auto"`` means bf16 on CUDA and fp32 on the CPU, so moving such a run between
    the two changes its precision with the device; set amp to "off" or "bf16" to pin it.
    """

    # what to train
    model: str = _identity("vgg9")
    width: float = _identity(1.0)
    dataset: str = _identity("cifar10")
    data_dir: str | None = None
    download: bool = False
    # use only N training images, drawn by the "subset" random stream
    train_subset: int | None = _identity(None)
    augment: bool | None = _identity(None)  # None: the data set's default (CIFAR: crop + flip)
    # a UTF-8 file read instead of a text data set's own text; its vocabulary and SHA-256 are
    # checked on resume, so the path itself may change
    text_file: str | None = None
    # size of a text model (gpt); None: the model's default (qtrain.models.gpt.GPTConfig)
    n_layer: int | None = _identity(None)
    n_head: int | None = _identity(None)
    n_embd: int | None = _identity(None)
    block_size: int | None = _identity(None)  # the context, in tokens
    dropout: float | None = _identity(None)
    bias: bool | None = _identity(None)
    tie_weights: bool | None = _identity(None)
    # how to train it
    method: str = _identity("bc-adam")
    grid: str = _identity("binary")
    delta: float | None = _identity(None)  # None: the grid's default (end levels at ±1)
    scale: str = _identity("none")
    policy: str = _identity("conv")
    activations: str = _identity("float")
    bc_stochastic: bool = _identity(False)
    bop_gamma: float | None = _identity(None)
    bop_tau: float | None = _identity(None)
    bop_sigma: float | None = _identity(None)
    epochs: int = _identity(160, when=lambda config: config.schedule != "constant")
    batch_size: int = _identity(128)
    lr: float = _identity(0.01)
    schedule: str = _identity("step")  # ×0.1 at 50% and 75% of training [ours]
    weight_decay: float = _identity(0.0)
    momentum: float = _identity(0.9)
    beta2: float = _identity(0.999)  # Adam's β₂ (β₁ = 0.9)
    # stop after this many optimizer steps (None: after `epochs`); mid-epoch if need be
    max_steps: int | None = _identity(None)
    warmup_steps: int = _identity(0)  # linear warm-up of "warmup-cosine" and "warmup-linear"
    min_lr: float = _identity(0.0)  # where "warmup-cosine" and "warmup-linear" end
    # momentum (SGD) or β₁ (Adam) cycled against the learning rate down to this; None: fixed
    momentum_min: float | None = _identity(None)
    # fast-training options (docs/speedrun.md)
    label_smoothing: float = _identity(0.0)  # training loss only; 0: off
    ema_decay: float = _identity(0.0)  # evaluate an average of the weights; 0: off
    whiten_init: bool = _identity(False)  # initialise a patch-whitening first layer
    tta: str = _identity("none")  # test-time augmentation: none, flip, flip-translate
    # hold N training images out as a validation split ("validation" random stream)
    val_images: int = _identity(0)
    # stop training once this many seconds are spent (a run stopped so is finished)
    time_budget_s: float | None = None
    grad_clip: float = _identity(0.0)  # clip the global gradient norm to this; 0: off
    # text data: evaluate every N steps (each "epoch" of the loop is N steps long)
    eval_every: int | None = _identity(None)
    eval_batches: int = 20  # text data: validation windows = eval_batches × batch_size
    seed: int = _identity(0)
    # where and how fast
    device: str = "auto"
    amp: str = _identity("auto")  # bf16 autocast on CUDA, off on CPU
    channels_last: bool = True
    compile: bool = False
    eval_batch_size: int = 1000
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of every epoch only
    threads: int = 0  # torch intra-op threads; 0 keeps PyTorch's default
    log: str = "none"  # mirror metrics to a tracker: none or tensorboard (qtrain.train.loggers)

    def validate(self) -> RunConfig:
        """Check value ranges; returns self so calls chain."""
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_number("lr", self.lr)
        if self.lr > MAX_LR:
            raise ConfigError(f"lr must be at most {MAX_LR:g}, got {self.lr:g}; lower --lr")
        _positive_number("width", self.width)
        if self.delta is not None:
            _positive_number("delta", self.delta)
        for key in ("bop_gamma", "bop_tau", "bop_sigma"):
            if getattr(self, key) is not None and not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.amp not in AMP_MODES:
            raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.train_subset is not None:
            _positive_int("train_subset", self.train_subset)
        for key in ("max_steps", "eval_every"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        _positive_int("eval_batches", self.eval_batches)
        if isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be a whole number >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ConfigError(
                f"min_lr must be in [0, lr={self.lr:g}], got {self.min_lr:g}; lower min_lr"
            )
        if not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ConfigError(
                f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}"
            )
        self._validate_fast_training()
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
        if self.checkpoint_every_steps < 0 or self.threads < 0:
            raise ConfigError("checkpoint_every_steps and threads must be >= 0")
        return self

    def _validate_fast_training(self) -> None:
        check_label_smoothing(self.label_smoothing)
        check_ema_decay(self.ema_decay)
        check_tta(self.tta)
        if self.momentum_min is not None and not 0 <= self.momentum_min <= self.momentum:
            raise ConfigError(
                f"momentum_min must be in [0, momentum={self.momentum:g}], got "
                f"{self.momentum_min}; lower momentum_min or leave it unset"
            )
        if isinstance(self.val_images, bool) or self.val_images < 0:
            raise ConfigError(f"val_images must be a whole number >= 0, got {self.val_images}")
        if self.time_budget_s is not None:
            _positive_number("time_budget_s", self.time_budget_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return from_dict({**self.to_dict(), **changes})


def identity_keys(config: RunConfig | None = None) -> tuple[str, ...]:
    """The config keys that define a run like `config` (all that may, without a config)."""
    return tuple(
        f.name
        for f in fields(RunConfig)
        if IDENTITY in f.metadata and (config is None or f.metadata[IDENTITY](config))
    )


def identity_change(saved: dict, config: RunConfig) -> tuple[str, object, object] | None:
    """The first identity key whose value in `config` differs from the `saved` config dict.

    A key missing from `saved` (a run made before the key existed) counts as its default.
    Returns (key, saved value, new value), or None when the identity is the same.
    """
    for key in identity_keys(config):
        before = saved.get(key, _FIELDS[key].default)
        after = getattr(config, key)
        if before != after:
            return key, before, after
    return None


def check_same_identity(saved: dict, config: RunConfig, run_dir) -> None:
    """ValueError naming the key and both values if `config` is not the run `saved` describes."""
    change = identity_change(saved, config)
    if change is not None:
        key, before, after = change
        raise ConfigError(
            f"cannot resume: the run in {run_dir} was trained with {key}={before!r}, "
            f"not {after!r}; resume with {key}={before!r} or start a new --out folder"
        )


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a whole number > 0, got {value!r}")


def _positive_number(name: str, value) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


_FIELDS = {f.name: f for f in fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def _allowed_types(name: str) -> tuple[type, ...]:
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(
        f"unknown config key {key!r}{did_you_mean(key, _FIELDS)}; "
        "see `qtrain train --help` for the keys"
    )


def coerce(key: str, value):
    """Check `value` against the type of `key`; ints are accepted where floats are expected."""
    if key not in _FIELDS:
        raise _unknown_key(key)
    allowed = _allowed_types(key)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    names = " or ".join("none" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key {key!r} needs a value of type {names}, got {value!r}")


def from_dict(values: dict) -> RunConfig:
    """A validated RunConfig from a flat dict (unknown keys and wrong types are refused)."""
    checked = {key: coerce(key, value) for key, value in values.items()}
    return RunConfig(**checked).validate()


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from `--set`; the value is read as TOML (numbers, true/false, strings)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key not in _FIELDS:
        raise _unknown_key(key)
    if raw.lower() in ("none", "null") and type(None) in _allowed_types(key):
        return key, None  # unset; a string key such as tta keeps the word "none"
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as bc-adam is a string
    return key, coerce(key, value)


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def list_presets() -> list[str]:
    """Names of the TOML presets shipped with qtrain (usable as `--config NAME`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_toml(path: str | Path) -> dict:
    """The flat key/value table of a TOML file, or of a shipped preset given by name."""
    path = Path(path)
    if not path.is_file() and (PRESET_DIR / f"{path.name}.toml").is_file():
        path = PRESET_DIR / f"{path.name}.toml"
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass a TOML file or one of the presets "
            f"{', '.join(list_presets())}"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {path} has a table [{key}]; qtrain configs are flat key = value"
            )
        coerce(key, value)
    return data


def to_toml(config: RunConfig) -> str:
    """The config as TOML text (keys whose value is None are left out)."""
    lines = []
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
