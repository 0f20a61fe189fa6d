"""Typed run configuration: one flat table of keys in sections, each key declared once.

A run's configuration is one flat TOML table (``key = value``), loaded from a file or a shipped
preset and overridden from the CLI; every run folder and checkpoint stores the resolved table,
so a run can be repeated from its folder alone. Unknown keys and values of the wrong type are
refused with one sentence that names the key and the fix.

Each key (a field of `RunConfig`) declares once, in its `Key` metadata, everything the rest of
qtrain needs to know about it; nothing elsewhere keeps a list of keys:

    section   where a reader finds it: model, text model, data, method, optimizer and schedule,
              fast training, evaluation, run, machine (`qtrain list keys` prints them so)
    kind      identity   the key changes the numbers the run computes (precision included):
                         resuming with another value is refused, an experiment reuses a folder
                         only when every identity key matches, and it travels with an export
              run        it describes the run without changing what is computed so far (a
                         time budget, the number of validation windows, a text file whose
                         content is checked by its SHA-256): it may change on resume and it
                         travels with an export
              machine    where and how fast the same arithmetic runs (device, threads, memory
                         layout, compile, evaluation batch, checkpoint cadence, the data
                         folder, the tracker): it may change on resume, and it never leaves
                         the machine (exports strip it)
    when      identity only for some runs: the number of epochs of a constant schedule (a
              constant schedule can be extended), the quantization keys of a float run
    applies   the runs the key means something for (`Scope`); a key set away from its default
              on a run it does not apply to is refused with one line rather than ignored
    same      how a saved value and a new one are compared (default: equal). A key naming a
              trained model by its path (init_from, distill_from) compares only whether it is
              set: the path may move, and what it names is checked by the SHA-256 the run
              records (`qtrain.train.start`, `qtrain.train.distill`)

Quantization keys (grid, delta, scale, policy) are accepted by a float (fp-*) run, so that a
preset can switch its method from the command line, but they are not part of its identity: a
float run computes the same numbers whatever they say (flip_every, a run key, is accepted
alike: a float run counts no flips). The exception is the policy of a float
run with `act_bits`: it picks the linear layers whose inputs are quantized, so it is identity.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from qtrain.base.errors import UserError
from qtrain.base.names import did_you_mean, unknown_name
from qtrain.data.augment import Augmentation
from qtrain.models.act_quant import ACT_NORMS
from qtrain.quant.activations import ACT_BITS
from qtrain.train.ema import check_ema_decay, check_ema_horizon
from qtrain.train.float_first import check_float_fraction, check_quant_ramp
from qtrain.train.losses import check_label_smoothing
from qtrain.train.tta import check_tta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SCHEDULES = ("step", "cosine", "constant", "warmup-cosine", "warmup-linear")
PER_STEP_SCHEDULES = ("warmup-cosine", "warmup-linear")
AMP_MODES = ("auto", "off", "bf16")
# act_bits: the widths the activation quantizer supports (qtrain.quant.activations)
ACT_BITS_VALUES = f"an integer from {ACT_BITS[0]} to {ACT_BITS[-1]} (8 is BitNet's A8) or none"
# No method learns with steps this large, and near 1e38 Adam's step size overflows float32.
MAX_LR = 1e6

SECTIONS = (
    "model",
    "text model",
    "data",
    "method",
    "optimizer and schedule",
    "fast training",
    "distillation",
    "evaluation",
    "run",
    "machine",
)
IDENTITY, RUN, MACHINE = "identity", "run", "machine"


class ConfigError(UserError):
    """A configuration value or file that cannot be used."""


# The evaluation minibatch. Small, because on a CPU an evaluation is fastest when a batch's
# activations stay in cache: the speedrun's test pass on 2 cores takes 0.65-0.83x its time at
# batch 1000, in bf16 and in float32 (benchmarks/bench_eval_batch.py, docs/speedrun.md "Where
# the time goes"); on a GPU a batch of 128 already keeps it busy on CIFAR.
EVAL_BATCH = 128


@dataclass(frozen=True)
class Scope:
    """The runs a key applies to: `test(config)` is True for them, `phrase` names them and
    `subject(config)` names what a run that is not among them is (for the refusal)."""

    phrase: str
    test: Callable[[RunConfig], bool]
    subject: Callable[[RunConfig], str]


def _modality(config: RunConfig) -> str:
    from qtrain.data.registry import dataset_info

    return dataset_info(config.dataset).modality


def _method(config: RunConfig):
    from qtrain.methods.presets import parse_method

    return parse_method(config.method)


def _model_options(config: RunConfig) -> tuple[str, ...]:
    from qtrain.models.registry import model_info

    return model_info(config.model).options


_DATA = lambda c: f"data set {c.dataset!r}"  # noqa: E731
_METHOD = lambda c: f"method {c.method!r}"  # noqa: E731
IMAGES = Scope("image data sets", lambda c: _modality(c) == "image", _DATA)
TEXT = Scope("text data sets", lambda c: _modality(c) == "text", _DATA)
BC = Scope("BinaryConnect (bc-*) methods", lambda c: _method(c).mode == "bc", _METHOD)
FLIPS = Scope("bop-adam and bop2-adam", lambda c: _method(c).mode in ("bop", "bop2"), _METHOD)
BOP2 = Scope("bop2-adam", lambda c: _method(c).mode == "bop2", _METHOD)
ADAM = Scope("Adam and AdamW methods", lambda c: _method(c).base != "sgd", _METHOD)
ROUNDS = Scope("methods that put float weights on the grid (bc-*, sr-*, r-*)",
               lambda c: _method(c).mode in ("bc", "sr", "r"), _METHOD)  # fmt: skip
ROUNDS_STOCHASTICALLY = Scope(
    "methods that round stochastically (sr-*, bc-* with bc_stochastic)",
    lambda c: _method(c).mode == "sr" or (_method(c).mode == "bc" and c.bc_stochastic),
    lambda c: _METHOD(c) + (" without bc_stochastic" if _method(c).mode == "bc" else ""),
)
PER_STEP = Scope(
    f"the per-step schedules ({', '.join(PER_STEP_SCHEDULES)})",
    lambda c: c.schedule in PER_STEP_SCHEDULES,
    lambda c: f"schedule {c.schedule!r}",
)


def _model_option(key: str, takers: str = "gpt", kind: str = "text") -> Scope:
    """The scope of a model's option `key`; `takers` names the (`kind`) models whose
    `options` hold it (a test compares it with the registry)."""
    return Scope(
        f"{kind} models that take it ({takers})",
        lambda c: key in _model_options(c),
        lambda c: f"model {c.model!r}",
    )


def _quantized(config: RunConfig) -> bool:
    return _method(config).mode != "fp"


def _picks_layers(config: RunConfig) -> bool:
    """The policy changes a run that quantizes weights, or one whose act_bits quantize the
    inputs of the linear layers the policy picks (a float-weight run too)."""
    return _quantized(config) or config.act_bits is not None


SPEEDNET_ORDER = _model_option("norm_after_pool", "speednet", "image")

ACT_QUANT = Scope("runs that set act_bits", lambda c: c.act_bits is not None,
                  lambda c: "a run without act_bits")  # fmt: skip


WITH_TTA = Scope("runs that set tta", lambda c: c.tta != "none",
                 lambda c: "a run without tta")  # fmt: skip


BUDGETED = Scope("runs with a time_budget_s", lambda c: c.time_budget_s is not None,
                  lambda c: "a run without time_budget_s")  # fmt: skip


RESIZED = Scope("runs that set resize_min_side", lambda c: c.resize_min_side is not None,
                lambda c: "a run without resize_min_side")  # fmt: skip


DISTILL = Scope("runs that distill (distill_from set)", lambda c: c.distill_from is not None,
                lambda c: "a run without distill_from")  # fmt: skip


def _not_constant(config: RunConfig) -> bool:
    return config.schedule != "constant"


@dataclass(frozen=True)
class Key:
    """What a config key is (module docstring): its section, kind, identity condition, scope
    and one line of help."""

    section: str
    kind: str
    doc: str
    when: Callable[[RunConfig], bool] | None = None
    applies: Scope | None = None
    values: str | None = None  # the values it takes, in words, when its type alone does not say
    same: Callable[[object, object], bool] | None = None  # None: saved == new

    def is_identity(self, config: RunConfig | None = None) -> bool:
        """True when the key is identity for `config` (for some run, without a config)."""
        if self.kind != IDENTITY:
            return False
        return config is None or self.when is None or self.when(config)


def _key(default, section: str, doc: str, kind: str = IDENTITY, *, when=None, applies=None,
         values=None, same=None):  # fmt: skip
    assert section in SECTIONS and kind in (IDENTITY, RUN, MACHINE)
    spec = Key(section, kind, doc, when, applies, values, same)
    return field(default=default, metadata={"key": spec})


def _both_set_or_neither(before, after) -> bool:
    """The comparison of a path to a trained model: whether it is set (module docstring)."""
    return (before is None) == (after is None)


@dataclass
class RunConfig:
    """Everything that determines a training run (docs/paper.md §2 defaults), in sections.

    The identity rule: a key is identity when it changes what is computed, including the
    precision of the arithmetic (``amp``: bf16 activations keep 8 bits of mantissa). A key that
    only changes where or in which order the same arithmetic runs may change on resume; such
    a change can break bit-exactness, which holds only for the same device, threads and
    memory layout. ``amp = "auto"`` is resolved when a run is created (bf16 where it is native,
    float32 elsewhere: `qtrain.train.devices`) and the run records the resolved value.
    """

    # -- model
    model: str = _key("vgg9", "model", "network name (qtrain list models)")
    width: float = _key(1.0, "model", "channel width multiplier")
    activations: str = _key("float", "model", "float, or binary activations (sign)")
    norm_after_pool: bool = _key(False, "model", "BatchNorm after each block's max-pool "
                                 "(airbench's order), not before it",
                                 applies=SPEEDNET_ORDER)  # fmt: skip
    init_from: str | None = _key(None, "model", "start from the weights of a trained model of "
                                 "this architecture: a run folder, checkpoint, packed file or "
                                 "Hugging Face folder (checked by SHA-256 on resume)",
                                 same=_both_set_or_neither)  # fmt: skip
    # -- text model: None takes the model's default (qtrain.models.gpt.GPTConfig)
    n_layer: int | None = _key(None, "text model", "transformer blocks",
                               applies=_model_option("n_layer"))  # fmt: skip
    n_head: int | None = _key(None, "text model", "attention heads per block",
                              applies=_model_option("n_head"))  # fmt: skip
    n_embd: int | None = _key(None, "text model", "width of the residual stream",
                              applies=_model_option("n_embd"))  # fmt: skip
    block_size: int | None = _key(None, "text model", "the context, in tokens (hf: the training "
                                  "window, default min(256, the model's context))",
                                  applies=_model_option("block_size", "gpt, hf"))  # fmt: skip
    dropout: float | None = _key(None, "text model", "dropout probability",
                                 applies=_model_option("dropout"))  # fmt: skip
    bias: bool | None = _key(None, "text model", "biases in linear layers and norms",
                             applies=_model_option("bias"))  # fmt: skip
    tie_weights: bool | None = _key(None, "text model", "the head shares the token embedding",
                                    applies=_model_option("tie_weights"))  # fmt: skip
    hf_path: str | None = _key(None, "text model", "folder of a Hugging Face causal LM for model "
                               "hf (config.json, weights, tokenizer): it may move, its config "
                               "is checked on resume", RUN,
                               applies=_model_option("hf_path", "hf"))  # fmt: skip
    # -- data
    dataset: str = _key("cifar10", "data", "data set name (qtrain list datasets)")
    data_dir: str | None = _key(None, "data", "folder holding the data set", MACHINE)
    download: bool = _key(False, "data", "fetch a missing archive", MACHINE)
    train_subset: int | None = _key(None, "data", "train on N images drawn by the subset stream",
                                    applies=IMAGES)  # fmt: skip
    augment: bool | None = _key(None, "data", "crop + flip (None: the data set's default)",
                                applies=IMAGES)  # fmt: skip
    text_file: str | None = _key(None, "data", "a UTF-8 file read instead of the data set's "
                                 "text (its vocabulary and SHA-256 are checked on resume)", RUN,
                                 applies=TEXT)  # fmt: skip
    val_images: int = _key(0, "data", "hold N training images out as a validation split",
                           applies=IMAGES)  # fmt: skip
    # -- method
    method: str = _key("bc-adam", "method", "training method (qtrain list methods)")
    grid: str = _key("binary", "method", "binary, ternary or <k>bit", when=_quantized)
    delta: float | None = _key(None, "method", "grid step Δ (None: end levels at ±1)",
                               when=_quantized)  # fmt: skip
    scale: str = _key("none", "method", "weight scale: none, he, absmean, absmean-tensor",
                      when=_quantized)  # fmt: skip
    policy: str = _key("conv", "method", "which parameters are quantized: conv, "
                       "conv-except-first, linear, conv+linear, all",
                       when=_picks_layers)  # fmt: skip
    act_bits: int | None = _key(None, "method", "quantize the inputs of the policy's linear "
                                "layers to this many bits per token, 2..8 (8: BitNet's A8; "
                                "None: float inputs)", values=ACT_BITS_VALUES)  # fmt: skip
    act_norm: str = _key("rms", "method", "before act_bits' quantizer: rms (an RMSNorm with a "
                         "learnable gain) or none", applies=ACT_QUANT)  # fmt: skip
    init: str = _key("auto", "method", "where quantized weights start: auto (the method's "
                     "default; with init_from, SR, R and Bop round it), rademacher, round, keep",
                     when=_quantized)  # fmt: skip
    bc_stochastic: bool = _key(False, "method", "BC's forward weights by stochastic rounding",
                               applies=BC)  # fmt: skip
    sr_uniforms: str = _key("torch", "method", "where stochastic rounding's uniforms come from: "
                            "torch (torch.rand on the run's rounding stream) or counter (a "
                            "hash of each weight's index under keys drawn from that stream, "
                            "made inside the fused rounding step; qtrain.quant.uniforms)",
                            applies=ROUNDS_STOCHASTICALLY, values="torch or counter")  # fmt: skip
    float_fraction: float = _key(0.0, "method", "train the quantized weights in float for this "
                                 "fraction of the run's steps first, then quantize them "
                                 "(qtrain.train.float_first; 0: off)", applies=ROUNDS)  # fmt: skip
    quant_ramp: float = _key(0.0, "method", "after the float phase (or from the start), move "
                             "BC's weights onto the grid over this fraction of the run's steps: "
                             "w_r + λ(Q(w_r) − w_r), λ rising linearly to 1 (qtrain.train."
                             "float_first; 0: at once)", applies=BC)  # fmt: skip
    bop_gamma: float | None = _key(None, "method", "Bop's γ (None: the method's default)",
                                   applies=FLIPS)  # fmt: skip
    bop_tau: float | None = _key(None, "method", "Bop's τ (None: the method's default)",
                                 applies=FLIPS)  # fmt: skip
    bop_sigma: float | None = _key(None, "method", "Bop2's σ (None: the method's default)",
                                   applies=BOP2)  # fmt: skip
    # -- optimizer and schedule
    lr: float = _key(0.01, "optimizer and schedule", "base learning rate")
    weight_decay: float = _key(0.0, "optimizer and schedule", "L2 (Adam, SGD) or decoupled "
                               "(AdamW) weight decay")  # fmt: skip
    momentum: float = _key(0.9, "optimizer and schedule", "SGD's momentum, or Adam's β₁")
    beta2: float = _key(0.999, "optimizer and schedule", "Adam's β₂", applies=ADAM)
    batch_size: int = _key(128, "optimizer and schedule", "training minibatch")
    epochs: int = _key(160, "optimizer and schedule", "epochs (identity unless the "
                       "schedule is constant, which lets a run be extended)",
                       when=_not_constant)  # fmt: skip
    schedule: str = _key("step", "optimizer and schedule", "step (×0.1 at 50% and 75%), "
                         "cosine, constant, warmup-cosine, warmup-linear")  # fmt: skip
    warmup_steps: int = _key(0, "optimizer and schedule", "linear warm-up steps",
                             applies=PER_STEP)  # fmt: skip
    min_lr: float = _key(0.0, "optimizer and schedule", "where the schedule ends",
                         applies=PER_STEP)  # fmt: skip
    momentum_min: float | None = _key(None, "optimizer and schedule", "cycle momentum (β₁) "
                                      "against the learning rate down to this")  # fmt: skip
    max_steps: int | None = _key(None, "optimizer and schedule", "stop after this many steps "
                                 "(None: after `epochs`), mid-epoch if need be")  # fmt: skip
    optimizer_impl: str = _key("foreach", "optimizer and schedule", "the base optimizer's "
                               "kernels: foreach (PyTorch's loop, bit for bit) or fused (one "
                               "kernel a step, faster; the same formula rounded differently "
                               "in the last bit)", values="foreach or fused")  # fmt: skip
    grad_clip: float = _key(0.0, "optimizer and schedule", "clip the global gradient norm to "
                            "this (0: off)")  # fmt: skip
    # -- fast training (docs/speedrun.md)
    label_smoothing: float = _key(0.0, "fast training", "label smoothing of the training loss")
    ema_decay: float = _key(0.0, "fast training", "evaluate an average of the weights (0: off)")
    ema_horizon: float = _key(0.0, "fast training", "evaluate an average of the weights whose "
                              "decay spans this fraction h of the run's S steps: 1 − 1/(h·S), "
                              "S as fitted (0: off; instead of ema_decay)")  # fmt: skip
    crop_padding: int = _key(4, "fast training", "the random crop's reach: pad by p pixels, "
                             "crop back at an offset of up to p each way "
                             "(qtrain.data.augment; 0: no shift)", applies=IMAGES)  # fmt: skip
    crop_fill: str = _key("zeros", "fast training", "what the crop's padding holds: zeros, or "
                          "reflect (the image mirrored at its edge)", applies=IMAGES,
                          values="zeros or reflect")  # fmt: skip
    flip: str = _key("random", "fast training", "the horizontal flip: random (each image, each "
                     "epoch, with probability ½) or alternating (drawn once per image, inverted "
                     "every other epoch)", applies=IMAGES,
                     values="random or alternating")  # fmt: skip
    whiten_init: bool = _key(False, "fast training", "initialise a patch-whitening first layer",
                             applies=IMAGES)  # fmt: skip
    tta: str = _key("none", "fast training", "test-time augmentation: none, flip, "
                    "flip-translate", applies=IMAGES)  # fmt: skip
    tta_each_epoch: bool = _key(True, "fast training", "augment every evaluation (false: only "
                                "the run's last; the others see one view)",
                                applies=WITH_TTA)  # fmt: skip
    resize_min_side: int | None = _key(None, "fast training", "progressive resizing "
                                       "(qtrain.train.resizing): the side, in pixels, of the "
                                       "first epoch's images (None: off)",
                                       applies=IMAGES)  # fmt: skip
    resize_until: float = _key(0.5, "fast training", "the fraction of the run by which the side "
                               "has grown back to the data set's", applies=RESIZED)  # fmt: skip
    # -- distillation (qtrain.train.distill)
    distill_from: str | None = _key(None, "distillation", "train against the logits of this "
                                    "teacher: a run folder, checkpoint, packed file or Hugging "
                                    "Face folder (checked by SHA-256 on resume)",
                                    same=_both_set_or_neither)  # fmt: skip
    distill_temperature: float = _key(1.0, "distillation", "τ: both softmaxes at z/τ, the "
                                      "soft term times τ²", applies=DISTILL)  # fmt: skip
    distill_weight: float = _key(0.5, "distillation", "λ: loss = (1−λ)·CE + λ·τ²·KL(teacher ‖ "
                                 "student)", applies=DISTILL)  # fmt: skip
    # -- evaluation
    eval_every: int | None = _key(None, "evaluation", "evaluate every N steps (text runs; "
                                  "image runs evaluate once an epoch)", applies=TEXT)  # fmt: skip
    eval_batches: int = _key(20, "evaluation", "validation windows = eval_batches × batch_size",
                             RUN, applies=TEXT)  # fmt: skip
    flip_every: int = _key(1, "evaluation", "count flips (the flip_rate record) on every Nth "
                           "step only: its mean over those steps, one pass over the quantized "
                           "weights saved on the others (a float run counts none)", RUN,
                           values="a whole number of steps, 1 or more")  # fmt: skip
    # -- run
    seed: int = _key(0, "run", "the seed of every random stream")
    time_budget_s: float | None = _key(None, "run", "stop training after this many seconds "
                                       "(a run stopped so is finished)", RUN)  # fmt: skip
    fit_to_budget: bool = _key(False, "run", "choose the epochs (at most `epochs`) at the end "
                               "of the first, from its time, so that the schedule ends inside "
                               "time_budget_s", applies=BUDGETED)  # fmt: skip
    refit_to_budget: bool = _key(True, "run", "with fit_to_budget and a per-step schedule: fit "
                                 "the length again at each later epoch's end, from that "
                                 "epoch's speed, redrawing the rest of the schedule from the "
                                 "current rate (qtrain.train.budget_fit)",
                                 applies=BUDGETED)  # fmt: skip
    fit_width: bool = _key(False, "run", "with fit_to_budget: before training, time a step at "
                           "width × 1, 0.75, 0.5 and train the widest that fits 65% of "
                           "`epochs` (qtrain.train.width_fit); the run records the width",
                           applies=BUDGETED)  # fmt: skip
    # -- machine
    device: str = _key("auto", "machine", "cpu, cuda, cuda:N or auto", MACHINE)
    amp: str = _key("auto", "machine", "autocast: bf16, off (float32), or auto: bf16 where "
                    "it is native (CUDA, AVX-512 BF16, AMX), else off; a run records the "
                    "resolved value")  # fmt: skip
    channels_last: bool = _key(True, "machine", "channels-last memory layout (images)", MACHINE)
    compile: bool = _key(False, "machine", "run the model through torch.compile", MACHINE)
    im2col_grad: bool = _key(True, "machine", "on a CPU with native bf16 (AVX-512 BF16, "
                             "AMX), the bf16 weight gradient of "
                             "a convolution with at most 64 output positions per image as one "
                             "im2col matrix product, faster there than oneDNN's "
                             "(qtrain.models.conv_grad)", MACHINE)  # fmt: skip
    fused_quant: str = _key("auto", "machine", "round quantized weights after each step in one "
                            "compiled loop (the same numbers): on, off, or auto: compile once "
                            "the eager steps have lost the compile time, if a compiler is "
                            "found (qtrain.methods.fused)", MACHINE,
                            values="auto, on or off")  # fmt: skip
    eval_batch_size: int = _key(EVAL_BATCH, "machine", "evaluation minibatch", MACHINE)
    checkpoint_every_steps: int = _key(0, "machine", "also checkpoint every N steps (0: at "
                                       "epoch ends only)", MACHINE)  # fmt: skip
    threads: int = _key(0, "machine", "torch intra-op threads (0: PyTorch's default)", MACHINE)
    log: str = _key("none", "machine", "mirror metrics to a tracker: none or tensorboard",
                    MACHINE)  # fmt: skip

    def validate(self) -> RunConfig:
        """Check value ranges; returns self so calls chain."""
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_number("lr", self.lr)
        if self.lr > MAX_LR:
            raise ConfigError(
                f"lr must be at most {MAX_LR:g}, got {self.lr:g}; lower {{lr}}", lr="lr"
            )
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
        self._validate_start_and_teacher()
        self._validate_act_quant()
        if not 0 <= self.beta2 < 1:
            raise ConfigError(f"beta2 must be in [0, 1), got {self.beta2}")
        if self.checkpoint_every_steps < 0 or self.threads < 0:
            raise ConfigError("checkpoint_every_steps and threads must be >= 0")
        return self

    def _validate_fast_training(self) -> None:
        check_label_smoothing(self.label_smoothing)
        check_float_fraction(self.float_fraction)
        check_quant_ramp(self.quant_ramp)
        if self.float_fraction + self.quant_ramp >= 1:
            raise ConfigError(
                f"float_fraction ({self.float_fraction:g}) and quant_ramp ({self.quant_ramp:g}) "
                "add up to the whole run, so no step would train on the grid; make their sum "
                "less than 1"
            )
        check_ema_decay(self.ema_decay)
        check_ema_horizon(self.ema_horizon)
        if self.ema_decay and self.ema_horizon:
            raise ConfigError(
                f"ema_decay ({self.ema_decay:g}) and ema_horizon ({self.ema_horizon:g}) both set "
                "the weight average's decay; set one of them to 0"
            )
        check_tta(self.tta)
        self.augmentation  # noqa: B018 (built to check the crop and flip keys)
        if self.momentum_min is not None and not 0 <= self.momentum_min <= self.momentum:
            raise ConfigError(
                f"momentum_min must be in [0, momentum={self.momentum:g}], got "
                f"{self.momentum_min}; lower momentum_min or leave it unset"
            )
        if isinstance(self.val_images, bool) or self.val_images < 0:
            raise ConfigError(f"val_images must be a whole number >= 0, got {self.val_images}")
        if self.time_budget_s is not None:
            _positive_number("time_budget_s", self.time_budget_s)
        side = self.resize_min_side
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
            raise ConfigError(f"resize_min_side must be a whole number of pixels >= 1, got "
                              f"{side!r}; or leave it unset to train at full size")  # fmt: skip
        if not (math.isfinite(self.resize_until) and 0 < self.resize_until <= 1):
            raise ConfigError(f"resize_until must be in (0, 1] (a fraction of the run), got "
                              f"{self.resize_until!r}")  # fmt: skip
        if self.fit_width and not self.fit_to_budget:
            raise ConfigError(
                "fit_width chooses the width from the time budget that fit_to_budget fits the "
                "run to; set fit_to_budget = true as well, or fit_width = false"
            )
        if self.fit_to_budget and self.max_steps is not None:
            raise ConfigError(
                "fit_to_budget chooses the number of epochs, but max_steps sets the run's "
                "length; leave max_steps unset or turn fit_to_budget off"
            )

    def _validate_act_quant(self) -> None:
        bits = self.act_bits
        if bits is not None and (isinstance(bits, bool) or bits not in ACT_BITS):
            raise ConfigError(f"act_bits must be {ACT_BITS_VALUES}, got {bits!r}")
        if self.act_norm not in ACT_NORMS:
            raise ConfigError(str(unknown_name("act_norm", self.act_norm, ACT_NORMS)))

    def _validate_start_and_teacher(self) -> None:
        from qtrain.methods.presets import INITS
        from qtrain.train.distill import check_distill_temperature, check_distill_weight

        if self.init not in INITS:
            raise ConfigError(str(unknown_name("init", self.init, INITS)))
        check_distill_temperature(self.distill_temperature)
        check_distill_weight(self.distill_weight)
        if self.init_from is not None and self.whiten_init:
            raise ConfigError(
                "whiten_init sets the first layer from the data and init_from sets every "
                "weight; leave whiten_init = false to start from init_from"
            )

    @property
    def augmentation(self) -> Augmentation:
        """The training crop and flip (`crop_padding`, `crop_fill`, `flip`); a bad value
        raises a UserError naming the key."""
        return Augmentation(self.crop_padding, self.crop_fill, self.flip)

    @property
    def keeps_average(self) -> bool:
        """Whether the run evaluates a weight average (`ema_decay` or `ema_horizon`)."""
        return bool(self.ema_decay or self.ema_horizon)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> RunConfig:
        return from_dict({**self.to_dict(), **changes})


def key_spec(name: str) -> Key:
    """The `Key` of config key `name` (ConfigError with a did-you-mean when unknown)."""
    if name not in _FIELDS:
        raise _unknown_key(name)
    return _FIELDS[name].metadata["key"]


def keys(*, section: str | None = None, kind: str | None = None) -> tuple[str, ...]:
    """Config keys in declaration order, only those of `section` and `kind` when given."""
    return tuple(
        name
        for name, f in _FIELDS.items()
        if (section is None or f.metadata["key"].section == section)
        and (kind is None or f.metadata["key"].kind == kind)
    )


def identity_keys(config: RunConfig | None = None) -> tuple[str, ...]:
    """The config keys that define a run like `config` (all that may, without a config)."""
    return tuple(name for name in _FIELDS if key_spec(name).is_identity(config))


def portable(values: dict) -> dict:
    """`values` (a config dict) without its machine keys: what may leave the machine."""
    return {key: value for key, value in values.items() if _kind(key) != MACHINE}


def _kind(key: str) -> str:
    # A key this version does not know (a file from a later one) is kept: it is not ours to drop.
    return _FIELDS[key].metadata["key"].kind if key in _FIELDS else RUN


def inapplicable(config: RunConfig) -> str | None:
    """One sentence for the first key set away from its default on a run it does not apply
    to (the names in `config` must be known: call after they are checked), else None."""
    for name, f in _FIELDS.items():
        scope = f.metadata["key"].applies
        value = getattr(config, name)
        if scope is None or value == f.default or scope.test(config):
            continue
        fix = "leave it unset" if f.default is None else f"set it to {f.default!r}"
        return f"{name} applies to {scope.phrase}, not to {scope.subject(config)}; {fix}"
    return None


def identity_change(saved: dict, config: RunConfig) -> tuple[str, object, object] | None:
    """The first identity key whose value in `config` differs from the `saved` config dict.

    A key missing from `saved` (a run made before the key existed) counts as its default.
    Returns (key, saved value, new value), or None when the identity is the same.
    """
    return _first_change(saved, config, identity_keys(config))


def portable_change(saved: dict, config: RunConfig) -> tuple[str, object, object] | None:
    """The first key that is not a machine key whose value differs (as `identity_change`).

    Stricter than the identity: it also compares the run keys (a time budget) and the keys
    that are identity only for some runs (the epochs of a constant schedule), so that a
    finished run is never taken for a longer one or one with another budget.
    """
    return _first_change(saved, config, keys(kind=IDENTITY) + keys(kind=RUN))


def _first_change(saved: dict, config: RunConfig, names) -> tuple[str, object, object] | None:
    for key in names:
        before = saved.get(key, _FIELDS[key].default)
        after = getattr(config, key)
        same = key_spec(key).same
        if not (same(before, after) if same else before == after):
            return key, before, after
    return None


def check_same_identity(saved: dict, config: RunConfig, run_dir) -> None:
    """ConfigError naming the key and both values if `config` is not the run `saved` describes."""
    change = identity_change(saved, config)
    if change is not None:
        key, before, after = change
        raise ConfigError(
            f"cannot resume: the run in {run_dir} was trained with {key}={before!r}, "
            f"not {after!r}; resume with {{{key}}} or start a new {{out}} folder",
            **{key: f"{key}={before!r}", "out": "run"},
        )


def describe_keys() -> str:
    """Every key by section: name, default, kind and scope, and its line of help."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name in keys(section=section):
            spec, default = key_spec(name), _FIELDS[name].default
            notes = [spec.kind] + ([f"only for {spec.applies.phrase}"] if spec.applies else [])
            lines.append(f"  {name} = {default!r}  ({'; '.join(notes)})  {spec.doc}")
    return "\n".join(lines)


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
        f"unknown config key {key!r}{did_you_mean(key, _FIELDS)}; {{keys}} lists them",
        keys="qtrain.train.config.describe_keys()",
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
    values = _FIELDS[key].metadata["key"].values
    if values:
        raise ConfigError(f"config key {key!r} needs {values}, got {value!r}")
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
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {path} is not valid TOML (byte {e.start} is not UTF-8); save it as "
            "UTF-8 text"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(
                f"config file {path} has a table [{key}]; qtrain configs are flat key = value"
            )
        try:
            coerce(key, value)
        except ConfigError as e:  # the same sentence, naming the file it comes from
            raise ConfigError(f"config file {path}: {e.template}", **e.settings) from None
    return data


def to_toml(config: RunConfig) -> str:
    """The config as flat TOML text, a comment line before each section (keys whose value is
    None are left out)."""
    lines, section = [], None
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if key_spec(key).section != section:
            section = key_spec(key).section
            lines.append(f"# {section}")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
