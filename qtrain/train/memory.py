"""The memory a training step needs, estimated before any data is read.

For one process (one rank) on its device, in bytes, with P the bytes of the parameters (each
tensor once, float32), Q those of the quantized ones and F = P − Q:

    peak = M + O + X + D + max(G + A(b), W(b), G + T(b), G + V(e))

    M     the model: P plus its buffers (BatchNorm's running statistics)
    G     = P, the gradients: a step's backward writes them and the next step's zero_grad
          (after its forward) frees them, so they are alive while the next forward saves its
          activations, and during an evaluation
    O     the optimizer: k·P_b + (n + s)·Q, where
          k·P_b  the base optimizer's state over the bytes P_b it steps (P; only F for Bop and
                 Bop2, which hide the quantized gradients from it): k = 2 for Adam and AdamW
                 (m and v), 1 for SGD with momentum (0 without)
          n·Q    qtrain's flat state of the quantized weights (`methods.optimizer.BUFFERS`):
                 n = 1 for BC (w_r), 1 for Bop (m), 2 for Bop2 (m, v), 0 for FP, SR and R
          s·Q    scratch buffers kept from step to step (`methods.flat.FlatWork`): s = 2 for
                 BC, SR and R (the rounded result and the rounding's work; BC with a measured
                 scale 2 more, the grid levels before and after), 1 for Bop and Bop2 (the
                 gradient), 0 for FP
    X     extras: the EMA's average of the model's floating state (float32) when the run keeps one;
          DistributedDataParallel's gradient buckets (P) under torchrun; the teacher's weights
          and buffers (floating ones in float32, as `qtrain.train.distill` keeps them) when
          the run distills
    D     the data set held on the device: N·(C·S² + 8) for an in-memory image set of N
          images (uint8 pixels, int64 labels), 8·n for a text of n tokens (int64), 0 for
          ImageNet (read a batch at a time); N (train, at most train_subset, plus test) and n
          from the registry (`DatasetInfo.examples`), a text_file's n from its size in bytes
          (a character takes at least one)
    A(b)  activations at the per-rank batch b: the tensors autograd saves in the forward pass
          and training loss for backward, with the batch (x, y) itself, each storage once,
          parameters and buffers left out (they are in M); under autocast that includes the
          bf16 copies of the weights; with a teacher its logits, alive through the step, and
          what the distillation loss saves. A is affine in b: a saved tensor either has the
          batch as a dimension or does not depend on it.
    T(b)  the teacher's forward pass (distill_from): the most bytes alive at once while it
          computes its logits under no_grad, before the model's forward (0 without a teacher)
    W(b)  backward: the most bytes alive at once while it runs, from what the forward left
          (A, logits, loss) through the gradients of activations and the parameters'
          gradients written so far (G is not added: zero_grad freed the last step's)
    V(e)  evaluation at the per-rank evaluation batch e: the most bytes alive at once in an
          evaluation forward (test-time augmentation and loss included) without gradients;
          with an EMA plus the copy of the live weights and the rounded averages it swaps in

A, W, T and V are measured, not modelled: the model runs its forward pass, loss, backward and
evaluation on fake tensors of the run's device (`qtrain.train.fake_step`), which carry shapes
and dtypes but no memory, so the estimate needs neither memory nor data; `check_fits` runs them
at the precision the trainer will compute in (`devices.resolve_amp`).

A run fits when peak ≤ (1 − MARGIN) × the memory its device has available
(`qtrain.train.meminfo.available_memory`, shared equally by the processes of one machine
under torchrun on the CPU); `check_fits` refuses it otherwise, naming the estimate and the
largest batch sizes that fit, found by bisection over fake steps (no term decreases with the
batch). For a global batch B and evaluation batch E over W ranks (1 without torchrun),
b = B/W and e = E/W, each at most the split it batches (`batches`).

Not counted, and left to the margin: what kernels allocate inside themselves (oneDNN's
reorders, cuDNN's and cuBLAS's workspaces), the optimizer step's temporaries (Adam's √v on
CUDA), the allocator's rounding and the interpreter's own growth. In CPU runs of
benchmarks/bench_memory.py these came to 4–30% of the estimate (docs/reliability.md, Memory),
hence MARGIN = 25%; glibc's habit of keeping freed memory in its heap can add as much again to
a process's resident size. Not counted at all: torch.compile (which usually saves fewer
tensors, so the eager figure is an upper bound), the whitening set-up (5,000 images at once,
before the first step), ImageNet's loader workers, and what stays in host memory when the step
runs on a GPU. ImageNet's class count is unknown before its folders are read; the probe
model's 10 classes stand in.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qtrain import data as qdata
from qtrain import methods
from qtrain.base.errors import UserError
from qtrain.methods.optimizer import BUFFERS, FLIPPING
from qtrain.methods.scales import MEASURED
from qtrain.train.config import RunConfig
from qtrain.train.devices import resolve_amp, resolve_device
from qtrain.train.fake_step import NOT_FAKEABLE, FakeStep
from qtrain.train.meminfo import available_memory
from qtrain.train.settings import image_size

MARGIN = 0.25  # of the available memory, left to what the estimate does not count (module doc)
# s of the module doc: flat scratch buffers (in units of Q) each mode keeps between steps.
SCRATCH = {"fp": 0, "bc": 2, "sr": 2, "r": 2, "bop": 1, "bop2": 1}
MEASURED_SCALE_SCRATCH = 2  # BC with a measured scale: grid levels before and after a step


@dataclass(frozen=True)
class StepMemory:
    """The terms of the module doc, in bytes, for one rank."""

    model: int
    gradients: int
    optimizer: int
    extras: int
    data: int
    activations: int
    backward: int
    evaluation: int
    teacher: int = 0  # T(b)

    @property
    def fixed(self) -> int:
        """What does not depend on the batch: M + O + X + D."""
        return self.model + self.optimizer + self.extras + self.data

    @property
    def training(self) -> int:
        """max(G + A, W, G + T): the most a training step adds to `fixed`."""
        return max(self.gradients + self.activations, self.backward,
                   self.gradients + self.teacher)  # fmt: skip

    @property
    def evaluating(self) -> int:
        """G + V: what an evaluation adds to `fixed`."""
        return self.gradients + self.evaluation

    @property
    def total(self) -> int:
        return self.fixed + max(self.training, self.evaluating)


def tensor_bytes(tensors) -> int:
    """Bytes of `tensors`, each object once."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def state_terms(
    config: RunConfig, model: nn.Module, ranks: int = 1, teacher: nn.Module | None = None
) -> dict[str, int]:
    """M, G, O and X of the module doc for `model` and the run's `teacher` (None when it
    does not distill), on any device, the meta device too."""
    spec = methods.parse_method(config.method)
    quantized, full = methods.split_parameters(model, config.policy)
    if spec.mode == "fp":
        quantized, full = [], quantized + full
    p, q = tensor_bytes(quantized + full), tensor_bytes(quantized)
    moments = {"adam": 2, "adamw": 2, "sgd": 1 if config.momentum else 0}[spec.base]
    stepped = p - q if spec.mode in FLIPPING else p
    scratch = SCRATCH[spec.mode]
    if spec.mode == "bc" and config.scale in MEASURED:
        scratch += MEASURED_SCALE_SCRATCH
    floating = [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]
    average = sum(t.numel() * 4 for t in {id(t): t for t in floating}.values())  # float32
    extras = (average if config.keeps_average else 0) + (p if ranks > 1 else 0)
    return {
        "model": p + tensor_bytes(model.buffers()),
        "gradients": p,
        "optimizer": moments * stepped + (len(BUFFERS.get(spec.mode, ())) + scratch) * q,
        "extras": extras + teacher_bytes(teacher),
        "quantized": q,
    }


def teacher_bytes(teacher: nn.Module | None) -> int:
    """The bytes of a teacher's weights and buffers, floating ones in float32 (0 for None)."""
    if teacher is None:
        return 0
    tensors = {id(t): t for t in (*teacher.parameters(), *teacher.buffers())}.values()
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)


def data_bytes(config: RunConfig) -> int:
    """D of the module doc: the bytes the run's data set keeps on its device."""
    info = qdata.dataset_info(config.dataset)
    if info.examples is None:
        return 0
    train, test = info.examples
    if info.modality == "text":
        tokens = train + test
        if config.text_file:
            with contextlib.suppress(OSError):  # a missing file is refused when it is read
                tokens = Path(config.text_file).expanduser().stat().st_size
        return 8 * tokens
    side = image_size(config)
    images = min(train, config.train_subset or train) + test
    return images * (info.in_channels * side * side + 8)


def batches(config: RunConfig, ranks: int) -> tuple[int, int]:
    """(b, e): the per-rank training and evaluation batches of `ranks` ranks (module doc).

    An image run's B is taken at most as large as its training split (a larger one is refused
    once the split is read, with its own sentence) and E at most as large as the largest
    split evaluated (test, validation); a text run evaluates at its training batch.
    """
    info = qdata.dataset_info(config.dataset)
    if info.modality == "text":
        return config.batch_size, config.batch_size
    train, test = info.examples or (config.batch_size, config.eval_batch_size)
    batch = min(config.batch_size, config.train_subset or train, train)
    evaluated = min(config.eval_batch_size, max(test, config.val_images))
    return max(1, batch // ranks), max(1, evaluated // ranks)


def process_layout() -> tuple[int, int]:
    """(W, L): ranks in the job and processes on this machine (1, 1 without torchrun)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 1
    return torch.distributed.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def step_memory(
    config: RunConfig,
    probe: FakeStep,
    state: dict[str, int],
    batch: int,
    eval_batch: int,
) -> StepMemory:
    """The estimate at per-rank `batch` and `eval_batch`, from `state_terms` and `probe`."""
    activations, backward = probe.training(batch)
    return StepMemory(
        model=state["model"],
        gradients=state["gradients"],
        optimizer=state["optimizer"],
        extras=state["extras"],
        data=data_bytes(config),
        activations=activations,
        backward=backward,
        evaluation=probe.evaluation(eval_batch) + ema_swap(config, state),
        teacher=probe.teacher_forward(batch),
    )


def ema_swap(config: RunConfig, state: dict[str, int]) -> int:
    """What evaluating an EMA adds to V: the live weights' copy (M) and the rounded averages
    swapped in (Q)."""
    return state["model"] + state["quantized"] if config.keeps_average else 0


def largest(fits, upper: int) -> int:
    """The largest n in 1 … upper with fits(n), for a `fits` that holds below some n (0 when
    it holds for none): bisection."""
    low, high = 0, upper  # fits(low) holds (or low = 0); the answer is ≤ high
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def run_device(config: RunConfig) -> torch.device:
    """The device the run will compute on: its `device` setting, with the current CUDA device
    when none is named (torchrun's rank has made its own GPU current by then)."""
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_fits(config: RunConfig, model: nn.Module, teacher: nn.Module | None = None) -> None:
    """Refuse a run whose estimated step (module doc) exceeds (1 − MARGIN) of the memory its
    device has available, with the estimate, what is available and the batch sizes that fit;
    `model` is the config's model built on the meta device (moved onto fake tensors here), and
    `teacher` its teacher's, when it distills.

    Skipped where the available memory cannot be read (`meminfo.available_memory`) or the
    model cannot run on fake tensors (`NOT_FAKEABLE`).
    """
    device = run_device(config)
    available = available_memory(device)
    if available is None:
        return
    config = resolve_amp(config, device)  # the precision the trainer will compute in
    ranks, sharing = process_layout()
    budget = int((1 - MARGIN) * available / sharing)
    state = state_terms(config, model, ranks, teacher)
    try:
        probe = FakeStep(config, model, device, teacher)
        batch, eval_batch = batches(config, ranks)
        need = step_memory(config, probe, state, batch, eval_batch)
        if need.total <= budget:
            return
        fix, settings = _fix(config, probe, state, budget - need.fixed, ranks)
    except NOT_FAKEABLE:
        return
    shared = f" to {sharing} processes" if sharing > 1 else ""
    problem = (
        f"a training step of this run needs about {_size(need.total)} of {device} memory "
        f"({_terms(need, batch * ranks, eval_batch * ranks)}), but {_size(available)} is "
        f"available{shared} and qtrain plans on {1 - MARGIN:.0%} of it ({_size(budget)})"
    )
    raise UserError(f"{problem}; {fix}", **settings)


def _fix(config: RunConfig, probe: FakeStep, state: dict[str, int], room: int, ranks: int):
    """(the refusal's fix, its settings): the largest batch sizes whose training step and
    evaluation add at most `room` bytes to the fixed terms, as multiples of the `ranks`."""
    gradients = state["gradients"]

    def training(n: int) -> float:
        try:
            activations, backward = probe.training(n)
        except ValueError:  # BatchNorm after pooling cannot train on one example
            return math.inf
        return max(gradients + activations, backward, gradients + probe.teacher_forward(n))

    def evaluating(n: int) -> int:
        return gradients + probe.evaluation(n) + ema_swap(config, state)

    batch, eval_batch = batches(config, ranks)
    if probe.text:  # evaluated at the training batch
        fits = {"batch_size": (lambda n: max(training(n), evaluating(n)) <= room, batch)}
    else:
        fits = {
            "batch_size": (lambda n: training(n) <= room, batch),
            "eval_batch_size": (lambda n: evaluating(n) <= room, eval_batch),
        }
    wanted = {name: largest(fit, now - 1) for name, (fit, now) in fits.items() if not fit(now)}
    if 0 in wanted.values():
        smaller = "smaller n_layer, n_embd or block_size" if probe.text else "smaller {width}"
        return (
            f"even one example per step does not fit; choose a smaller model or a {smaller}, "
            "or a device with more memory",
            {} if probe.text else {"width": "width"},
        )
    settings = {name: f"{name}={n * ranks}" for name, n in wanted.items()}
    return "use " + " and ".join("{" + name + "}" for name in settings), settings


def _terms(need: StepMemory, batch: int, eval_batch: int) -> str:
    fixed = (
        ("model", need.model),
        ("gradients", need.gradients),
        ("optimizer state", need.optimizer),
        ("weight average, gradient buckets and teacher", need.extras),
        ("data", need.data),
    )
    return ", ".join(
        [f"{name} {_size(n)}" for name, n in fixed if n]
        + [
            f"activations {_size(need.activations)} (backward at most {_size(need.backward)}"
            + (f", teacher's forward {_size(need.teacher)}" if need.teacher else "")
            + f") at batch size {batch}",
            f"evaluation {_size(need.evaluation)} at batch size {eval_batch}",
        ]
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
