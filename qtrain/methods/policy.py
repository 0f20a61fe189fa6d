"""Which parameters a training method quantizes.

The paper quantizes convolution weights only; linear layers, BatchNorm and biases stay in
full precision (docs/paper.md §2). The policy is an option:

| policy        | quantized parameters                                       |
|---------------|------------------------------------------------------------|
| `conv`        | weights of every nn.Conv1d/2d/3d (and transposed variants) |
| `conv+linear` | the above plus the weights of every nn.Linear              |
| `all`         | every parameter of the model (BatchNorm and biases too)    |
"""

from __future__ import annotations

from torch import nn

from qtrain.base.names import unknown_name

POLICIES = ("conv", "conv+linear", "all")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise unknown_name("quantization policy", policy, POLICIES)
    return policy


def quantized_parameter_names(model: nn.Module, policy: str = "conv") -> list[str]:
    """Names (as in `model.named_parameters()`) of the parameters the policy quantizes."""
    check_policy(policy)
    if policy == "all":
        return [name for name, _ in model.named_parameters()]
    layer_types: tuple[type, ...] = (nn.modules.conv._ConvNd,)
    if policy == "conv+linear":
        layer_types += (nn.Linear,)
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, layer_types) and getattr(module, "weight", None) is not None:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def split_parameters(
    model: nn.Module, policy: str = "conv"
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(quantized, full-precision) trainable parameters of `model` under `policy`."""
    chosen = set(quantized_parameter_names(model, policy))
    quantized, full = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quantized if name in chosen else full).append(p)
    return quantized, full
