"""An exponential moving average (EMA) of the weights, evaluated in place of the live weights.

After optimizer step t (t = 1, 2, …), for every averaged tensor w:

    e ← d_t·e + (1 − d_t)·w,     d_t = min(d, (1 + t)/(10 + t)),     e starts at w

(Polyak averaging with the warm-up of TensorFlow's ExponentialMovingAverage(num_updates), so
that early averages are not dominated by the random initialisation; d = ``ema_decay``). What
is averaged, and what evaluation then uses:

| tensor                                   | w averaged            | evaluated as              |
|------------------------------------------|-----------------------|---------------------------|
| quantized weight, BC                     | latent w_r            | Q_d(e) on the (scaled) grid |
| quantized weight, SR / R / Bop           | w_b (on the grid)     | Q_d(e) on the (scaled) grid |
| full-precision parameter (and all of FP) | w                     | e                         |
| BatchNorm running mean and variance      | the running statistic | e                         |
| integer buffers (batch counters)         | not averaged          | the live value            |

For BC the deployed weights are therefore Q(EMA(w_r)), never EMA(w_b): the average moves the
latent weights, and the model still holds weights on its grid while it is evaluated. A tensor
the state dict lists under several names (a GPT's token embedding tied to its output head) is
one tensor: it is averaged once, under its first name (the name the quantization policy
gives it), so a raw average kept under another name can never overwrite its Q_d(e). Scales
follow the method: a fixed scale (`none`, `he`) is that of the parameter, an absmean scale is
measured from e itself (`qtrain.methods.scales`). BatchNorm's running statistics belong to the
live weights; averaging them with the same decay gives statistics of the averaged trajectory,
as airbench's Lookahead does with the whole state dict (the exact alternative, re-estimating
them for the averaged weights, costs a pass over training data at every evaluation).

Lookahead (Zhang et al. 2019; airbench) also keeps such an average but writes it back into the
live weights every k steps; qtrain keeps the live trajectory untouched (for BC, w_r is the
method's own state) and uses the average only to evaluate. The state (t and every e) is
checkpointed, so a resumed run continues the same average bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from qtrain.base.errors import UserError
from qtrain.methods.scales import broadcastable, fixed_scale, measured_scale, scaled_round
from qtrain.train.checks import check_fraction

WARMUP = 10  # d_t = min(d, (1 + t)/(WARMUP + t))


def check_ema_decay(value: float) -> float:
    """`value` when it is a valid decay (a finite number in [0, 1); 0 means off)."""
    return check_fraction("ema_decay", value, "0 turns the average off; 0.99 to 0.9999 are usual")


def check_ema_horizon(value: float) -> float:
    """`value` when it is a valid horizon (a finite fraction of the run in [0, 1); 0: off)."""
    return check_fraction("ema_horizon", value, "a fraction of the run's steps; 0 turns it off, "
                          "0.05 averages about the last 5%")  # fmt: skip


def horizon_decay(horizon: float, steps: int) -> float:
    """The decay d whose average spans the fraction `horizon` = h of a run of `steps` = S
    optimizer steps: the EMA's weights fall by 1/e over 1/(1 − d) steps, so

        d = max(0, 1 − 1/(h·S))

    (h = 0.05: d = 0.99 for S = 2,000 steps, 0.971 for S = 700). A run fitted to its time
    budget learns S at the end of its first epoch, and the decay follows it."""
    span = horizon * steps
    return max(0.0, 1.0 - 1.0 / span) if span > 0 else 0.0


class WeightEMA:
    """The EMA of `model`'s weights as trained by `optimizer` (a QuantizedOptimizer)."""

    def __init__(self, model: nn.Module, optimizer, decay: float) -> None:
        self.model = model
        self.optimizer = optimizer
        self.decay = check_ema_decay(decay)
        self.updates = 0
        with torch.no_grad():
            self.averages = {
                name: w.detach().clone().float() for name, w in self._sources().items()
            }

    def _tensors(self) -> dict[str, torch.Tensor]:
        """first name → floating-point tensor of the model's state, each tensor once (tied
        parameters are one object under several names; state_dict and named_parameters both
        list a model's modules in the same order, so the first names are the policy's)."""
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in self.model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                tensors[name] = t
        return tensors

    def _quantized_names(self) -> list[str]:
        """The first name of each quantized parameter, in the optimizer's order."""
        names = {id(t): name for name, t in self._tensors().items()}
        return [names[id(p)] for p in self.optimizer.quantized]

    def _sources(self) -> dict[str, torch.Tensor]:
        """first name → the live tensor that is averaged (w_r for BC's quantized weights)."""
        sources = self._tensors()
        latent = self.optimizer.latent_weights()
        if latent:
            sources.update(zip(self._quantized_names(), latent, strict=True))
        return sources

    def factor(self) -> float:
        """d_t for the update about to be made (t = updates + 1)."""
        t = self.updates + 1
        return min(self.decay, (1 + t) / (WARMUP + t))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the live weights; call after every optimizer step."""
        weight = 1.0 - self.factor()
        for name, source in self._sources().items():
            average = self.averages[name]
            average.lerp_(source.detach().to(average.device, average.dtype), weight)
        self.updates += 1

    def evaluated_state(self) -> dict[str, torch.Tensor]:
        """name → the tensor evaluation uses (the table of the module docstring)."""
        opt = self.optimizer
        quantized = {
            name: p.dtype for name, p in zip(self._quantized_names(), opt.quantized, strict=True)
        }
        return evaluated_weights(self.averages, quantized, opt.grid, opt.scale)

    @contextlib.contextmanager
    def applied(self):
        """Within the block the model holds the evaluated weights; the live ones after it
        (bit for bit: they are copied back from a saved clone)."""
        state = self.model.state_dict(keep_vars=True)
        evaluated = self.evaluated_state()
        saved = {name: state[name].detach().clone() for name in evaluated}
        _copy_into(state, evaluated)
        try:
            yield self.model
        finally:
            _copy_into(state, saved)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "averages": {n: t.detach().cpu().clone() for n, t in self.averages.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()` of the same run (same decay, same averaged tensors).

        A state saved before tied tensors were averaged once also holds averages under their
        other names: they duplicate a tensor averaged under its first name and are left out.
        """
        saved = state["averages"].keys()
        names = self.model.state_dict(keep_vars=True).keys()
        if state["decay"] != self.decay or not self.averages.keys() <= saved <= names:
            raise UserError(
                "the saved weight average does not match this run (decay or averaged tensors "
                "differ); resume with the settings the run was created with"
            )
        self.updates = int(state["updates"])
        for name, average in self.averages.items():
            average.copy_(state["averages"][name])


@torch.no_grad()
def evaluated_weights(
    averages: dict[str, torch.Tensor], quantized: dict[str, torch.dtype], grid, scale: str
) -> dict[str, torch.Tensor]:
    """name → evaluated tensor from the averages e: s·Q_d(e/s) on the grid for the quantized
    names (cast to the parameter's dtype given in `quantized`), e itself for the others.

    s is the scale of kind `scale`: constant for `none`/`he`, measured from e for absmean.
    The trainer evaluates with these, and a checkpoint's model is rebuilt with them
    (`qtrain.train.rebuild.build_model`), so both give the same numbers. The quantized
    names come last: a caller that writes the values in order then leaves Q_d(e) in a
    quantized tensor even when `averages` also holds a raw average under another name of it
    (a tied weight in a checkpoint written before tied tensors were averaged once).
    """
    out = {name: e for name, e in averages.items() if name not in quantized}
    for name, dtype in quantized.items():
        e = averages[name]
        s = fixed_scale(scale, e)
        if s is None:
            s = measured_scale(scale, e)
        out[name] = scaled_round(e, broadcastable(s, e), grid, stochastic=False).to(dtype)
    return out


@torch.no_grad()
def _copy_into(state: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Overwrite the model tensors of `state` in place (parameters keep their storage, so
    BC's views into the optimizer's flat buffer stay views)."""
    for name, value in values.items():
        state[name].data.copy_(value)
