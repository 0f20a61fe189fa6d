"""A run's state between steps: the epoch in progress, its running sums, the records so far,
and how that state (with the model, optimizer, scheduler and weight average) is written into
a checkpoint and read back from one.

Exact resume: the data order and augmentation of batch b in epoch e are a pure function of
(seed, e, b); the model, optimizer (including BC's w_r and the rounding generator), scheduler,
running epoch sums and the default generators the run draws from (`generator_states`) are all
in the checkpoint. A run interrupted at any point and resumed therefore ends with
bit-identical weights and metrics on the CPU (same threads); on CUDA it draws the same random
numbers, and is bit-identical as far as the CUDA kernels it runs are deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qtrain import models
from qtrain.base.errors import UserError
from qtrain.data.tokens import TokenizerSpec
from qtrain.models.act_quant import act_quant_of
from qtrain.train.config import RunConfig, check_same_identity
from qtrain.train.devices import resolve_saved_amp
from qtrain.train.settings import is_text


@dataclass
class EpochSums:
    """Running sums of the epoch in progress (checkpointed for mid-epoch resume)."""

    loss: float = 0.0
    wrong: int = 0
    seen: int = 0
    seconds: float = 0.0
    batch: int = 0  # next batch index
    mid_seconds: float | None = None  # a fitted run: seconds at its middle step (`budget_fit`)
    # resumed on another machine at this batch (> 0): the middle step is that of the steps
    # trained from here on (`budget_fit.mid_step`)
    moved_at: int | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (0-based)
    sums: EpochSums = field(default_factory=EpochSums)
    metrics: list = field(default_factory=list)
    stopped: str | None = None  # why the run ended before its last epoch ("time budget")
    fit: dict | None = None  # with fit_to_budget, once chosen: `budget_fit.Fit.to_dict()`
    width_fit: dict | None = None  # with fit_width, what the new run measured (`width_fit`)
    machines: list = field(default_factory=list)  # where it trained (`hardware.moved`)


class RankSums:
    """This rank's running sums of the epoch in progress, kept on the device so that adding a
    step needs no host sync.

    `EpochSums` holds totals over all ranks: rank 0 starts from those (restored from a
    checkpoint), every other rank from zero, each adds its own shard, and the sum over ranks
    is the epoch's total.
    """

    def __init__(self, sums: EpochSums, main: bool, device: torch.device) -> None:
        self.device = device
        self.loss = torch.tensor(sums.loss if main else 0.0, dtype=torch.float64, device=device)
        self.wrong = torch.tensor(sums.wrong if main else 0, dtype=torch.int64, device=device)
        self.seen = sums.seen if main else 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add a step's mean loss over y and its top-1 mistakes (logits [N, V], y [N])."""
        self.loss += loss.detach().double() * y.numel()
        self.wrong += (logits.detach().argmax(-1) != y).sum()
        self.seen += y.numel()

    def total_into(self, sums: EpochSums, dist, started: float) -> None:
        """Set `sums` to the totals over all ranks (`dist`), and its seconds to those since
        `started` (a `time.perf_counter()` reading), taken after the sums synchronised."""
        sums.loss, sums.wrong = float(dist.all_sum(self.loss)), int(dist.all_sum(self.wrong))
        sums.seen = int(dist.all_sum(torch.tensor(self.seen, device=self.device)))
        sums.seconds = time.perf_counter() - started


def checkpoint_payload(
    config: RunConfig,
    splits,
    model,
    optimizer,
    scheduler,
    ema,
    quantized: list[str],
    state: TrainState,
    finished: bool,
) -> dict:
    """The checkpoint record (`qtrain.train.checkpoint`) of a run at `state`."""
    text = is_text(config.dataset)
    act_quant = act_quant_of(model)
    return {
        "config": config.to_dict(),
        "model": {
            "name": config.model,
            "num_classes": splits.num_classes,
            "width": config.width,
            "in_channels": splits.in_channels,
            "activations": config.activations,
            "options": _resolved_model_options(config.model, model),
            # a text model's token ids mean these characters, or this tokenizer's tokens
            # (sampling and evaluation need them)
            **(splits.token_record() if text else {}),
            # which linear layers quantize their inputs, and how (`qtrain.models.act_quant`)
            **({"act_quant": act_quant} if act_quant else {}),
        },
        **({"data": {"sha256": splits.sha256}} if text else {}),
        "method": {
            "name": config.method,
            "grid": optimizer.grid.to_dict(),
            "scale": config.scale,
            "policy": config.policy,
        },
        "quantized": list(quantized),
        "model_state": model.state_dict(),
        "training": {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": state.epoch,
            "sums": state.sums.to_dict(),
            "metrics": list(state.metrics),
            **generator_states(_device_of(model)),
            "finished": finished,
            "ema": ema.state_dict() if ema else None,
            "stopped": state.stopped,
            "fit": state.fit,
            "width_fit": state.width_fit,
            "machines": list(state.machines),
        },
    }


def generator_states(device: torch.device) -> dict:
    """The states of torch's default generators that a run on `device` draws from:
    "torch_rng", the CPU generator's, and "cuda_rng", the default generator's of `device` on a
    CUDA run (None on any other device).

    The other random draws of a run need no entry here: the optimizer's rounding generator is
    in its own `state_dict`, and the loaders make a fresh generator from the seed and the
    position in the run (epoch and batch, or step) for every shuffle, augmentation and text
    batch. What draws from the default generators while training is dropout (the GPT's
    `nn.Dropout` and attention dropout), from the default generator of the device it runs on.
    Under torchrun rank 0's states are saved and restored on every rank: every rank seeds its
    default generators alike and draws the same shapes (equal shards), so their states agree.
    """
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_generator_states(training: dict, device: torch.device) -> None:
    """Set torch's default generators to the `generator_states` saved in `training`.

    The CPU state is always restored. The CUDA state is restored into `device`'s default
    generator when the run is on CUDA and the checkpoint has one; it is ignored on the CPU (a
    CUDA checkpoint resumed on the CPU, where that stream does not exist; such a resume is not
    bit-exact anyway). A checkpoint without a CUDA state (written on the CPU, or before CUDA
    states were saved) resumes on CUDA with the CUDA generator as the run's set-up left it:
    the run continues, but its dropout masks differ from an uninterrupted run's.
    """
    torch.set_rng_state(training["torch_rng"].cpu())
    cuda_state = training.get("cuda_rng")
    if device.type == "cuda" and cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def _device_of(model) -> torch.device:
    """The device a run computes on: its model's (library code follows its inputs)."""
    return next(model.parameters()).device


def _resolved_model_options(name: str, model) -> dict:
    """Every option of the model, defaults included, so a rebuild needs no defaults of the
    version that reads the checkpoint (a text model's sizes; the hf model: the config dict its
    folder held and the window; speednet's `norm_after_pool`); {} for a model without any."""
    stored = models.model_info(name).stored_options
    return {option: getattr(model.config, option) for option in stored}


def restore_state(
    record: dict, config: RunConfig, run_dir, splits, model, optimizer, scheduler, ema
) -> TrainState:
    """Load checkpoint `record` of the run in `run_dir` into the model, optimizer, scheduler,
    weight average and torch's default generators, and return the state it was saved at.

    ValueError when `record` is not of this run: another identity (`config`), exported
    weights only, or, for a text run, another text.
    """
    saved = resolve_saved_amp(record.get("config", {}), _device_of(model))
    check_same_identity(saved, config, run_dir)
    training = record.get("training")
    if training is None:
        raise UserError(f"{run_dir} holds exported weights, not a resumable checkpoint")
    if is_text(config.dataset):
        check_same_model(run_dir, record["model"], config.model, model)
        check_same_text(run_dir, splits, record["model"], record.get("data", {}))
    # tensors arrive on the CPU and load_state_dict moves them to the device
    model.load_state_dict(record["model_state"])
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    if ema is not None:
        ema.load_state_dict(training["ema"])
    restore_generator_states(training, _device_of(model))
    return TrainState(
        epoch=int(training["epoch"]),
        sums=EpochSums(**training["sums"]),
        metrics=list(training["metrics"]),
        stopped=training.get("stopped"),
        fit=training.get("fit"),
        width_fit=training.get("width_fit"),
        machines=list(training.get("machines", [])),
    )


def check_same_model(run_dir, saved: dict, name: str, model) -> None:
    """A resumed text model must be the one the run built: its recorded options (for the hf
    model the config its folder held; the folder may move, its config may not)."""
    before, now = saved.get("options") or {}, _resolved_model_options(name, model)
    for key in sorted(set(before) & set(now)):
        if before[key] == now[key]:
            continue
        what = f"{key}={before[key]!r}, not {now[key]!r}"
        if isinstance(before[key], dict) and isinstance(now[key], dict):
            inner = sorted(k for k in set(before[key]) | set(now[key])
                           if before[key].get(k) != now[key].get(k))  # fmt: skip
            what = (f"a config.json whose {inner[0]} is {before[key].get(inner[0])!r}, not "
                    f"{now[key].get(inner[0])!r}")  # fmt: skip
        raise UserError(
            f"cannot resume: the run in {run_dir} was trained with {what}; resume with the "
            "original model (hf_path naming a folder with the same config.json) or start a new "
            "{out} folder",
            out="run",
        )


def check_same_text(run_dir, splits, saved_model: dict, data: dict) -> None:
    """A resumed text run must read the same text (the path may change, the text not), by the
    same tokenization: the same characters, or a tokenizer of the same class and vocabulary."""
    vocab = saved_model.get("vocab")
    saved_tokenizer = saved_model.get("tokenizer")
    if saved_tokenizer is not None or splits.tokenizer is not None:
        _check_same_tokenizer(run_dir, splits, saved_tokenizer, vocab)
    now = splits.vocab
    if splits.tokenizer is None and vocab != now:
        raise UserError(
            f"cannot resume: the run in {run_dir} was trained on a text with the "
            f"{len(vocab or '')} characters {vocab!r}, but {splits.source} has the "
            f"{len(now)} characters {now!r}; resume with the original text_file or start "
            "a new {out} folder",
            out="run",
        )
    if data.get("sha256") != splits.sha256:
        raise UserError(
            f"cannot resume: {splits.source} is not the text the run in "
            f"{run_dir} was trained on (SHA-256 differs); resume with the original "
            "text_file or start a new {out} folder",
            out="run",
        )


def _check_same_tokenizer(run_dir, splits, saved: dict | None, vocab: str | None) -> None:
    """The tokenizer part of `check_same_text` (either side may be by character)."""
    before = TokenizerSpec.from_record(saved) if saved is not None else None
    now = splits.tokenizer
    if before is not None and before.same_as(now):
        return

    def describe(spec, characters) -> str:
        if spec is not None:
            return spec.describe()
        return f"the {len(characters or '')} characters {characters!r}"

    raise UserError(
        f"cannot resume: the run in {run_dir} was trained on tokens of "
        f"{describe(before, vocab)}, but {splits.source} would now be read as tokens of "
        f"{describe(now, splits.vocab)}; resume with the original hf_path (the same "
        "tokenizer) or start a new {out} folder",
        out="run",
    )
