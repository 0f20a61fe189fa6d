"""Quantized activations at the inputs of quantized linear layers (BitNet b1.58's W1.58A8).

`apply_act_quant(model, description)` replaces each nn.Linear the description names by an
`ActQuantLinear`, which computes, for an input x [..., K]:

    y = W · Q_b(N(x)) + bias

    N(x)   = x · rsqrt(mean_j x_j² + 1e−6) · g     with norm "rms" (g [K], learnable, init 1),
                                                   computed in float32 as transformers'
                                                   LlamaRMSNorm; N(x) = x with norm "none"
    Q_b    per-token absmax rounding to b bits, straight-through gradient
           (`qtrain.quant.activations`)

The new layer holds the very Parameter objects of the old one (weight and bias), so parameter
identity, the optimizer's view and the state_dict keys `….weight`, `….bias` stay; the norm is
the submodule `rms_norm` (state key `….rms_norm.weight`, a full-precision parameter), the
layout of transformers' BitLinear with `use_rms_norm`. No hooks: a model deep-copies (weight
averages, exports) and pickles like any other.

Why a norm: in a pre-LayerNorm transformer the inputs of the attention output projection and
of the MLP's down projection are not normalised, and absmax rounding of a token with one large
outlier spends the b-bit range on it and rounds every other feature to a few levels. BitNet's
BitLinear (SubLN) and Hugging Face's "Fine-tuning LLMs to 1.58bit" normalise every quantized
linear layer's input first; "rms" does so, "none" quantizes the raw input.

A description is a plain dict, stored with checkpoints and packed files:

    {"bits": b (2..8), "norm": "rms" | "none", "modules": [names of the nn.Linear modules]}

`act_quant_plan(model, policy, bits, norm)` makes one for a run: the modules are the nn.Linear
layers whose weight `policy` quantizes (`qtrain.methods.quantized_parameter_names`), and
`act_quant_of(model)` reads one back from a model (None when it quantizes no activations).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name
from qtrain.methods import quantized_parameter_names
from qtrain.quant.activations import check_act_bits, quantize_activations

ACT_NORMS = ("rms", "none")
RMS_EPS = 1e-6
DESCRIPTION_KEYS = ("bits", "norm", "modules")


class RMSNorm(nn.Module):
    """x · rsqrt(mean_j x_j² + eps) · weight over the last dimension, in float32 (the result
    of the normalisation cast back to x's dtype, then times the weight: LlamaRMSNorm)."""

    def __init__(self, features: int, eps: float = RMS_EPS, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class ActQuantLinear(nn.Linear):
    """An nn.Linear whose input is normalised (optional) and quantized to `bits` bits per
    token before the product (module docstring); it shares `linear`'s weight and bias."""

    def __init__(self, linear: nn.Linear, bits: int, norm: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.bits = check_act_bits(bits)
        self.norm = _check_norm(norm)
        weight = linear.weight
        self.rms_norm = (
            RMSNorm(self.in_features, device=weight.device, dtype=weight.dtype)
            if norm == "rms"
            else None
        )
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in_features] → [..., out_features]."""
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        return F.linear(quantize_activations(x, self.bits), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act_bits={self.bits}, act_norm={self.norm!r}"


def _check_norm(norm: object) -> str:
    if norm not in ACT_NORMS:
        raise unknown_name("activation norm", norm, ACT_NORMS)
    return norm


def act_quant_modules(model: nn.Module, policy: str) -> list[str]:
    """Names (as in `model.named_modules()`) of the nn.Linear layers whose weight `policy`
    quantizes, in module order."""
    names = set(quantized_parameter_names(model, policy))
    chosen = {id(p) for name, p in model.named_parameters() if name in names}
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in chosen
    ]


def act_quant_plan(
    model: nn.Module, policy: str, bits: int, norm: str = "rms", *, name: str | None = None
) -> dict:
    """The description that quantizes the inputs of the linear layers `policy` quantizes.

    UserError when `policy` quantizes no nn.Linear of `model` (e.g. `conv` on a CNN); `name`
    (a registered model name) is how that sentence names the model.
    """
    modules = act_quant_modules(model, policy)
    if not modules:
        what = f"model {name!r}" if name else type(model).__name__
        raise UserError(
            f"act_bits quantizes the inputs of quantized linear layers, but policy {policy!r} "
            f"quantizes no nn.Linear of {what}; quantize linear layers with {{policy}} (or "
            "conv+linear), or leave act_bits unset",
            policy="policy=linear",
        )
    return {"bits": check_act_bits(bits), "norm": _check_norm(norm), "modules": modules}


def check_description(description: object) -> dict:
    """`description` when it is a valid description (module docstring), else UserError."""
    if not isinstance(description, dict) or set(description) != set(DESCRIPTION_KEYS):
        raise UserError(
            "an activation quantization description is a dict with the keys "
            f"{', '.join(DESCRIPTION_KEYS)}, got {description!r}"[:300]
        )
    check_act_bits(description["bits"])
    _check_norm(description["norm"])
    modules = description["modules"]
    if (
        not isinstance(modules, list)
        or not modules
        or not all(isinstance(name, str) for name in modules)
        or len(set(modules)) != len(modules)
    ):
        raise UserError(
            "the modules of an activation quantization description must be a non-empty list "
            f"of distinct module names, got {modules!r}"[:300]
        )
    return description


def apply_act_quant(model: nn.Module, description: dict | None) -> nn.Module:
    """`model` with the nn.Linear layers `description` names replaced by `ActQuantLinear`s
    (in place; returned for chaining). None applies nothing.

    UserError for an invalid description, or a name that is not a plain nn.Linear of `model`
    (nothing is replaced then).
    """
    if description is None:
        return model
    check_description(description)
    modules = dict(model.named_modules())
    for name in description["modules"]:
        module = modules.get(name)
        # exactly nn.Linear: a subclass may not compute through forward (MultiheadAttention's
        # out_proj), and an ActQuantLinear already quantizes its input
        if type(module) is not nn.Linear:
            what = "no module" if module is None else type(module).__name__
            raise UserError(
                f"activation quantization names module {name!r}, which is {what} in "
                f"{type(model).__name__}, not an nn.Linear; describe the model's own linear "
                "layers (act_quant_plan)"
            )
    for name in description["modules"]:
        model.set_submodule(
            name, ActQuantLinear(modules[name], description["bits"], description["norm"])
        )
    return model


def act_quant_of(model: nn.Module) -> dict | None:
    """The description of `model`'s activation quantization, or None when it has none."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantLinear)]
    if not layers:
        return None
    settings = {(m.bits, m.norm) for _, m in layers}
    if len(settings) > 1:
        raise UserError(
            f"{type(model).__name__} quantizes activations with several settings "
            f"{sorted(settings)}, which one description cannot hold; use one setting"
        )
    ((bits, norm),) = settings
    return {"bits": bits, "norm": norm, "modules": [n for n, _ in layers]}
