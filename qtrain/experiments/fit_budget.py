"""Fitting a recipe's schedule to the machine: measure the step, then choose the epochs.

A run whose schedule outlasts its budget (`time_budget_s`) is cut with its learning rate still
high. `--fit-budget` measures the run's step on this machine before the schedule is fixed and
chooses the number of epochs so that the whole schedule ends inside the budget:

    t_step   = median over `TIMED_STEPS` steps, after `WARMUP_STEPS` untimed ones, of the
               seconds of one training step (forward and loss under the run's autocast,
               zero_grad, backward, gradient clipping, the method's optimizer step) of the
               run's own model, optimizer, batch size, precision (amp resolved as the run
               resolves it), threads and device, on a batch of the run's training loader
    epochs   = min(E, ⌊(B·(1 − MARGIN) − t_probe − t_setup) / (S · t_step · OVERHEAD)⌋),
               at least 1
    budget   = B − t_probe, the fitted runs' time_budget_s, so that probe and run fit in B

with E the recipe's epochs, B its budget, S the steps of one epoch (the run's training
loader: the training split less the `val_images` held out, whole batches only, as the
trainer's loader counts them), t_setup the set-up the trainer counts in epoch 1 (the
whitening initialisation when `whiten_init`, measured in the probe) and t_probe the probe's
own wall seconds (building the run, data included, and its steps). `OVERHEAD` is what the
bare step does not do: the loader, augmentation, the schedule, the EMA, the running sums and
checks. With epochs < E the schedule is drawn over the fitted epochs: the run ends at min_lr.
One epoch that still does not fit is kept: the budget then cuts it.

The width is not fitted: choosing it needs validation runs on each kind of CPU (future work).

The fit is measured once per variant of an experiment and written to `fit.json` in the
variant's folder (`Fit`, with the machine it was measured on); the fitted epochs and budget go
into every cell's config, so each run's config.toml holds them. A later invocation reads
fit.json instead of measuring again, so resuming or re-reading the runs is exact; a fit.json
that cannot be read, or that was fitted for another recipe, is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qtrain.base.errors import UserError
from qtrain.base.io import atomic_write_text
from qtrain.train.config import RunConfig, portable, portable_change
from qtrain.train.devices import native_bf16, resolve_amp, resolve_device

FIT_FILE = "fit.json"
# The first steps pay once for what later steps reuse: oneDNN's kernel choice and primitive
# creation for each shape, the allocator growing its caches, Adam's moments allocated at the
# first step (and torch.compile's compilation): three steps cover them.
WARMUP_STEPS = 3
# The median of ten steps ignores up to four slow ones (another process taking a core); the
# thirteen steps are about 5 s of the preset at the 730 images/s of docs/speedrun.md, under
# 1% of its 20-minute budget.
TIMED_STEPS = 10
# benchmarks/bench_step_overhead.py (docs/speed.md, section 8) measured the trainer's step at
# 1.10-1.14x a bare loop of forward, loss, backward and optimizer step over ready-made batches
# for tiny_cnn (1.04-1.09x for a small GPT; one earlier run 1.18x); 1.15 covers that. For
# speednet the loader and the EMA are 2% of a step (docs/speedrun.md, "Where the time goes").
OVERHEAD = 1.15
MARGIN = 0.05  # of the budget, for a machine that runs slower than during the probe
# Not compared between a fit and the recipe it is used for: the fit holds for every seed.
UNFITTED = ("seed",)


@dataclass(frozen=True)
class Probe:
    """What the probe measured (module docstring): t_step, t_setup, S, t_probe, the machine."""

    step_seconds: float
    setup_seconds: float
    steps_per_epoch: int
    seconds: float
    machine: dict


@dataclass(frozen=True)
class Fit:
    """A fitted schedule (fit.json): the rule's inputs, its choice, and where it was measured.

    `recipe` holds the recipe's config (machine keys and seed left out) that the fit belongs to.
    """

    budget_s: float
    time_budget_s: float
    recipe_epochs: int
    epochs: int
    steps_per_epoch: int
    step_seconds: float
    overhead: float
    margin: float
    probe_seconds: float
    setup_seconds: float
    warmup_steps: int
    timed_steps: int
    machine: dict
    recipe: dict


def fitted_epochs(
    budget_s: float,
    recipe_epochs: int,
    steps_per_epoch: int,
    step_seconds: float,
    probe_seconds: float,
    setup_seconds: float,
    *,
    overhead: float = OVERHEAD,
    margin: float = MARGIN,
) -> int:
    """min(E, ⌊(B·(1 − margin) − t_probe − t_setup) / (S · t_step · overhead)⌋), at least 1."""
    room = budget_s * (1.0 - margin) - probe_seconds - setup_seconds
    epoch = steps_per_epoch * step_seconds * overhead
    fits = math.floor(room / epoch) if epoch > 0 else recipe_epochs
    return max(1, min(recipe_epochs, fits))


def check_fittable(config: RunConfig) -> None:
    """A UserError when the schedule of `config` cannot be fitted: no time budget, or a run
    length set in steps (max_steps) rather than epochs."""
    if config.time_budget_s is None:
        raise UserError(
            "{fit_budget} fits the schedule into the time budget, but the recipe has none; "
            "set {time_budget}",
            fit_budget="fit_budget",
            time_budget="time_budget_s",
        )
    if config.max_steps is not None:
        raise UserError(
            "{fit_budget} chooses the number of epochs, but the recipe's length is set by "
            "max_steps; leave {max_steps} unset",
            fit_budget="fit_budget",
            max_steps="max_steps",
        )


def check_unfitted(path: Path) -> None:
    """A UserError when `path` holds a fit: its variant's runs were fitted, so a run of the
    recipe as given would be another run in the same folder."""
    if path.exists():
        raise UserError(
            f"{path} holds the fit of the runs beside it; add {{fit_budget}} to continue them, "
            "or choose another {out} folder",
            fit_budget="fit_budget",
            out="output",
        )


def fit_schedule(config: RunConfig, path: Path) -> tuple[Fit, bool]:
    """(the fit of `config`, whether it was measured now): read from `path` when that file
    exists (refused when damaged or fitted for another recipe), else measured by `measure`
    and not yet written (`write_fit`)."""
    check_fittable(config)
    if path.exists():
        return read_fit(path, config), False
    return fit_from(config, measure(config)), True


def fit_from(config: RunConfig, probe: Probe) -> Fit:
    """The rule (module docstring) applied to `probe`, for the recipe `config`."""
    budget = config.time_budget_s
    if budget <= probe.seconds:
        raise UserError(
            f"measuring the step took {probe.seconds:.1f} s, the whole time budget of "
            f"{budget:g} s; raise {{time_budget}}",
            time_budget="time_budget_s",
        )
    epochs = fitted_epochs(budget, config.epochs, probe.steps_per_epoch, probe.step_seconds,
                           probe.seconds, probe.setup_seconds)  # fmt: skip
    return Fit(
        budget_s=budget,
        time_budget_s=budget - probe.seconds,
        recipe_epochs=config.epochs,
        epochs=epochs,
        steps_per_epoch=probe.steps_per_epoch,
        step_seconds=probe.step_seconds,
        overhead=OVERHEAD,
        margin=MARGIN,
        probe_seconds=probe.seconds,
        setup_seconds=probe.setup_seconds,
        warmup_steps=WARMUP_STEPS,
        timed_steps=TIMED_STEPS,
        machine=probe.machine,
        recipe=recipe_of(config),
    )


def fitted_config(config: RunConfig, fit: Fit) -> RunConfig:
    """`config` with the fitted epochs and time budget."""
    return config.replace(epochs=fit.epochs, time_budget_s=fit.time_budget_s)


def recipe_of(config: RunConfig) -> dict:
    """What a fit belongs to: the config with amp resolved on its device, without machine
    keys and the seed."""
    resolved = resolve_amp(config, resolve_device(config.device))
    return {k: v for k, v in portable(resolved.to_dict()).items() if k not in UNFITTED}


def describe(fit: Fit) -> str:
    """One line: the choice and what it was made from."""
    m = fit.machine
    precision = "bf16" if fit.recipe.get("amp") == "bf16" else "fp32"
    line = (
        f"{fit.epochs} of {fit.recipe_epochs} epochs, time budget {fit.time_budget_s:.1f} s "
        f"of {fit.budget_s:g} s ({fit.step_seconds:.3f} s a step × {fit.overhead:g} × "
        f"{fit.steps_per_epoch} steps an epoch, probe {fit.probe_seconds:.1f} s, set-up "
        f"{fit.setup_seconds:.1f} s; {m.get('cpu')}, {m.get('isa')}, {precision}, "
        f"threads {m.get('threads')}, {m.get('device')})"
    )
    epoch = fit.steps_per_epoch * fit.step_seconds * fit.overhead
    spare = fit.budget_s * (1 - fit.margin) - fit.probe_seconds - fit.setup_seconds
    return line + ("; one epoch does not fit: the budget will cut it" if epoch > spare else "")


# -- measuring ------------------------------------------------------------------------------


def measure(config: RunConfig, warmup: int = WARMUP_STEPS, timed: int = TIMED_STEPS) -> Probe:
    """Build the run of `config` (a `Trainer` in a scratch folder: its data, model, set-up,
    optimizer, precision, threads and device) and time its step on the first batch of its
    training loader (module docstring)."""
    from qtrain.train.trainer import Trainer

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qtrain-fit-") as scratch:
        trainer = Trainer(config, Path(scratch) / "run", log=lambda *a, **k: None,
                          progress=False)  # fmt: skip
        try:
            x, y = next(iter(trainer.train_loader.epoch(0)))
            for _ in range(warmup):
                _step(trainer, x, y)
            seconds = []
            for _ in range(timed):
                begun = time.perf_counter()
                _step(trainer, x, y)
                seconds.append(time.perf_counter() - begun)
            steps_per_epoch = len(trainer.train_loader)
            setup = trainer.setup_seconds
            about = machine(trainer.device)
        finally:
            trainer.close()
    return Probe(statistics.median(seconds), setup, steps_per_epoch,
                 time.perf_counter() - started, about)  # fmt: skip


def _step(trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One bare training step of `trainer`'s run (`Trainer.optimizer_step`: no schedule,
    weight average or records), finished on its device when it returns."""
    trainer.optimizer_step(x, y)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)


def machine(device: torch.device) -> dict:
    """Where a step was timed: the CPU's model name, the instruction set torch's CPU kernels
    use (which honours ATEN_CPU_CAPABILITY), native bf16 on `device`, threads, the device
    (a GPU by its name) and torch's version."""
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "cpu": cpu_name(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "threads": torch.get_num_threads(),
        "device": name,
        "torch": torch.__version__,
    }


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# -- fit.json -------------------------------------------------------------------------------


def write_fit(path: Path, fit: Fit) -> None:
    """fit.json, written atomically."""
    atomic_write_text(path, json.dumps(dataclasses.asdict(fit), indent=2) + "\n")


def read_fit(path: Path, config: RunConfig) -> Fit:
    """The fit saved at `path`; a UserError naming the file when it is not a fit record or
    was fitted for a recipe other than `config`."""
    fit = _parse(path)
    resolved = resolve_amp(config, resolve_device(config.device))
    unfitted = {key: getattr(config, key) for key in UNFITTED}
    change = portable_change({**fit.recipe, **unfitted}, resolved)
    if change is not None:
        key, before, after = change
        raise UserError(
            f"{path} was fitted for a recipe with {key}={before!r}, not {after!r}; delete it "
            "to measure again, or choose another {out} folder",
            out="output",
        )
    return fit


def _parse(path: Path) -> Fit:
    refuse = lambda why: UserError(  # noqa: E731
        f"{path} is not a fit record ({why}); the file was edited or damaged: delete it to "
        "measure again, or choose another {out} folder",
        out="output",
    )
    try:
        values = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise refuse("not JSON") from None
    if not isinstance(values, dict):
        raise refuse("not a JSON object")
    for f in dataclasses.fields(Fit):
        if f.name not in values:
            raise refuse(f"it lacks {f.name!r}")
        value, kind = values[f.name], _KINDS[f.type]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise refuse(f"{f.name} is {value!r}")
    if values["epochs"] < 1 or not values["time_budget_s"] > 0:
        raise refuse(f"epochs {values['epochs']}, time budget {values['time_budget_s']}")
    return Fit(**{f.name: values[f.name] for f in dataclasses.fields(Fit)})


# The JSON types of `Fit`'s fields (its annotations are strings: `from __future__`).
_KINDS = {"float": (int, float), "int": int, "dict": dict}
