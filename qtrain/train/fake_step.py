"""A run's training step and evaluation on fake tensors: what they save and hold, in bytes.

`torch._subclasses.FakeTensorMode` makes tensors that carry shapes, dtypes and a device but no
memory, so a model runs through its forward pass, loss and backward as it would on the device,
computing nothing. Autocast acts on them as on real tensors of their device (on meta tensors
it does not act at all, which would price a bf16 run in float32), so the bytes counted here
are those of the precision the run computes in. The quantities (A, W, V) are defined in
`qtrain.train.memory`.

Counting: a storage is counted once, however many tensors view it (a ReLU in place, a flatten,
the input a layer saves and the output the previous one saved). `LiveBytes` follows every
operator output from the operator that makes it until the last tensor viewing its storage is
freed (CPython frees a tensor when its last reference goes), and keeps the most bytes alive at
once. The model's parameters and buffers are made outside it and never counted.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qtrain import data as qdata
from qtrain.train.config import RunConfig
from qtrain.train.devices import autocast_context
from qtrain.train.distill import distillation_loss
from qtrain.train.losses import training_loss
from qtrain.train.settings import context_length, image_size
from qtrain.train.tta import tta_logits

# What a model that fake tensors cannot run raises: the estimate is then skipped.
NOT_FAKEABLE = (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)


class FakeStep:
    """A run's model on fake tensors of `device`, to measure A(b), W(b), V(e) and, when it
    distills, T(b) of `qtrain.train.memory`.

    `model` is the config's model built on the meta device, `teacher` its teacher's (or None);
    they are moved onto fake tensors in place. Raises one of `NOT_FAKEABLE` when a model does
    something fake tensors cannot (an operator without a fake kernel, an output whose shape
    depends on values).
    """

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        device: torch.device,
        teacher: nn.Module | None = None,
    ) -> None:
        self.config, self.device = config, device
        self.text = qdata.dataset_info(config.dataset).modality == "text"
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        with self.mode:
            self.model = model.to_empty(device=device)
            self.teacher = None if teacher is None else teacher.to_empty(device=device).eval()
        own = [*model.parameters(), *model.buffers()]
        if teacher is not None:
            own += [*teacher.parameters(), *teacher.buffers()]
        self.own = {_storage(t) for t in own}

    def _batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y as the loaders give them: images float32 [n, C, S, S] and labels int64 [n],
        or token ids int64 [n, T] twice."""
        kwargs = {"device": self.device}
        if self.text:
            shape = (size, context_length(self.config))
            return tuple(torch.zeros(shape, dtype=torch.int64, **kwargs) for _ in "xy")
        info = qdata.dataset_info(self.config.dataset)
        side = image_size(self.config)
        x = torch.zeros(size, info.in_channels, side, side, **kwargs)
        return x, torch.zeros(size, dtype=torch.int64, **kwargs)

    def training(self, batch: int) -> tuple[int, int]:
        """(A(b), W(b)) of a training step on `batch` examples (`qtrain.train.memory`).

        A: the bytes saved for backward by the forward pass and loss, with the batch itself
        (and the teacher's logits when the run distills), each storage once, the model's own
        tensors left out. W: the most bytes alive at once during backward, from the tensors
        alive when it starts (the saved ones, the batch, logits and loss) through the gradients
        it writes.
        """
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[_storage(t)] = t.untyped_storage().nbytes()
            return t

        c = self.config
        with self._faked(), LiveBytes() as live:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                x, y = self._batch(batch)
                for t in (x, y):
                    pack(t)
                self.model.train()
                with autocast_context(self.device, c.amp):
                    taught = self._teacher_logits(x)
                    logits = self.model(x).flatten(0, -2)
                    if taught is None:
                        loss = training_loss(logits, y.flatten(), c.label_smoothing)
                    else:
                        pack(taught)
                        loss = distillation_loss(logits, taught, y.flatten(),
                                                 c.distill_temperature, c.distill_weight,
                                                 c.label_smoothing)  # fmt: skip
            live.peak = live.now
            loss.backward()
            self.model.zero_grad(set_to_none=True)
        return sum(n for key, n in saved.items() if key not in self.own), live.peak

    def evaluation(self, batch: int) -> int:
        """V(e) without the EMA's copies: the most bytes alive at once while `batch` examples
        are evaluated (`qtrain.train.evaluation.evaluate`'s forward, TTA and loss)."""
        with self._faked(), torch.no_grad(), LiveBytes() as live:
            x, y = self._batch(batch)
            self.model.eval()
            with autocast_context(self.device, self.config.amp):
                logits = tta_logits(self.model, x, self.config.tta).flatten(0, -2)
            torch.nn.functional.cross_entropy(logits.float(), y.flatten(), reduction="sum")
        return live.peak

    def teacher_forward(self, batch: int) -> int:
        """T(b): the most bytes alive at once while the teacher computes its logits for
        `batch` examples under no_grad (0 without a teacher)."""
        if self.teacher is None:
            return 0
        with self._faked(), LiveBytes() as live:
            x, _ = self._batch(batch)
            with autocast_context(self.device, self.config.amp):
                self._teacher_logits(x)
        return live.peak

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(x).flatten(0, -2)

    @contextlib.contextmanager
    def _faked(self):
        # a fake dropout or init draws nothing real, but the generators are not the estimate's
        with torch.random.fork_rng(devices=[]), self.mode:
            yield


def _storage(t: torch.Tensor) -> int:
    """An identity of t's storage, shared by its views (fake storages have no address)."""
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """The most bytes of operator outputs alive at once while the mode is on.

    Each output's storage is counted from the operator that makes it until the last tensor
    that views it is freed (CPython frees a tensor when its last reference goes).
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage → [bytes, live tensors]
        self._tensors: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self._tensors:
                self._track(t)
        self.peak = max(self.peak, self.now)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = _storage(t)
        entry = self._storages.setdefault(key, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.now += entry[0]
        entry[1] += 1
        self._tensors[id(t)] = weakref.finalize(t, self._freed, id(t), key)

    def _freed(self, tensor: int, key: int) -> None:
        del self._tensors[tensor]
        entry = self._storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self._storages[key]

    def __exit__(self, *exc):
        for finalizer in list(self._tensors.values()):
            finalizer.detach()  # tensors that outlive the measurement are not its business
        return super().__exit__(*exc)
