"""Divergence detection: a non-finite loss or weight stops the run before anything is saved.

The loss of every step is watched on the device: the first non-finite one (its batch and
value) is remembered with tensor ops only, so no step waits for the host. `check` reads the
flag, a host sync, at the trainer's cadence and always before a checkpoint is written, where
it also scans the model's weights (a step can overflow them while its loss was finite). Under
torchrun every rank contributes its flag to one all-reduce (max), so all ranks raise together.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.train.distributed import DistributedContext


class DivergenceError(UserError):
    """The loss or the weights became NaN or infinite."""


def weights_finite(model: nn.Module) -> torch.Tensor:
    """True (a device bool) when every floating tensor of the model's state is finite."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


class DivergenceWatch:
    """The first non-finite loss since `reset`, kept on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.bad_batch = torch.full((), -1, dtype=torch.int64, device=self.device)  # -1: none
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=self.device)

    def watch(self, loss: torch.Tensor, batch: int) -> None:
        """Remember ``loss`` and ``batch`` if this is the first non-finite loss (no host sync)."""
        loss = loss.detach().double()
        first = ~torch.isfinite(loss) & (self.bad_batch < 0)
        self.bad_batch = torch.where(first, batch, self.bad_batch)
        self.bad_loss = torch.where(first, loss, self.bad_loss)

    def check(
        self, dist: DistributedContext, model: nn.Module | None, where: str, advice: str
    ) -> None:
        """Raise `DivergenceError` on every rank if any rank saw a non-finite loss, or (given
        ``model``) holds a non-finite weight. ``where`` names the step, ``advice`` the fix."""
        diverged = self.bad_batch >= 0
        if model is not None:
            diverged = diverged | ~weights_finite(model)
        if not dist.all_max(int(diverged)):
            return
        if int(self.bad_batch) >= 0:
            what = f"the loss became {float(self.bad_loss)} at {where}, batch {int(self.bad_batch)}"
        else:  # another rank's loss, or weights that overflowed in a step
            what = f"the training diverged (non-finite loss or weights) by {where}"
        raise DivergenceError(f"{what}; {advice}")
