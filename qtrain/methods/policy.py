"""Which parameters a training method quantizes.

The paper quantizes convolution weights only; linear layers, BatchNorm and biases stay in
full precision (docs/paper.md §2). BitNet b1.58 quantizes the linear layers of a transformer's
blocks and keeps embeddings, LayerNorms and the output head in full precision (§6). The policy
is an option:

| policy              | quantized parameters                                               |
|---------------------|--------------------------------------------------------------------|
| `conv`              | weights of every nn.Conv1d/2d/3d (and transposed variants)         |
| `conv-except-first` | `conv`'s weights but the first, in the model's parameter order     |
| `conv+linear`       | `conv`'s weights plus those of every nn.Linear                     |
| `linear`            | weights of every nn.Linear outside the model's full-precision part |
| `all`               | every trainable parameter (norms, embeddings and biases too)       |

`conv-except-first` keeps the first convolution (the stem, the layer that sees the input)
in full precision, as binary networks often do (Rastegari et al. 2016, "XNOR-Net"; the last
layer, a linear classifier, is in full precision under `conv` already). It holds few of the
weights (speednet: 0.7% of the convolution weights at width 1), and on the speedrun's
validation split it scored over `conv` by +0.56 points at width 0.5, +0.85 at width 0.75 and
+0.53 at width 1, every seed, so the speedrun preset uses it (docs/speedrun.md, "Training in
float first").

A model declares its full-precision part with a class or instance attribute
``full_precision_modules``: a tuple of submodule names (as in ``model.named_modules()``), e.g.
``("lm_head",)`` for the GPT, whose output head is an nn.Linear. Under `linear` no parameter of
a declared module (or of its children) is quantized, so a CNN that declares nothing has its
classifier's linear layers quantized and its convolutions kept in full precision. Only
`linear` reads the declaration: `conv+linear` and `all` keep their meaning for every model.

A Hugging Face transformers model passed as it is (a PreTrainedModel, which declares
nothing) has its output head found by its own ``get_output_embeddings()``: under `linear` the
head (and the token embedding tied to it) stays in full precision, so a Llama or Qwen2 has
exactly its block projections quantized. `linear` and `conv+linear` refuse a model built
from transformers' Conv1D (GPT-2: y = x·W + b with W stored [in, out], not an nn.Linear, so
its per-row scales would run along the wrong axis): wrap it in
`qtrain.models.hf.HFCausalLM`, which converts each Conv1D to the equivalent nn.Linear.

A frozen parameter (``requires_grad`` False) is never quantized, under any policy: no
optimizer step moves it, so it would never be put on a grid, and whoever froze it asked for
it to stay as it is (a pretrained stem, a fixed projection). It stays in full precision, and
`quantized_parameter_names` lists exactly the parameters the optimizer keeps on the grid.

A parameter shared by several modules (a GPT's token embedding tied to its output head) is one
parameter: it is listed once, under the first name ``model.named_parameters()`` gives it, and
under `linear` it stays in full precision when any declared module holds it.
"""

from __future__ import annotations

from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

POLICIES = ("conv", "conv-except-first", "conv+linear", "linear", "all")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise unknown_name("quantization policy", policy, POLICIES)
    return policy


def full_precision_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters held by the modules ``model.full_precision_modules`` names, and
    by the output head a transformers model gives as ``get_output_embeddings()``."""
    declared = getattr(model, "full_precision_modules", ())
    if not isinstance(declared, (tuple, list)) or not all(isinstance(n, str) for n in declared):
        raise UserError(
            f"{type(model).__name__}.full_precision_modules must be a tuple of submodule "
            f"names, got {declared!r}; write it as a tuple such as ('lm_head',)"
        )
    modules = dict(model.named_modules())
    missing = [name for name in declared if name not in modules]
    if missing:
        raise UserError(
            f"{type(model).__name__}.full_precision_modules names {', '.join(missing)}, which "
            "the model does not have; list names from model.named_modules()"
        )
    held = {id(p) for name in declared for p in modules[name].parameters()}
    return held | {id(p) for p in _output_embeddings(model).parameters()}


def _output_embeddings(model: nn.Module) -> nn.Module:
    """The head a transformers PreTrainedModel names with ``get_output_embeddings()`` (an
    empty module for every other model)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else nn.Module()


def _check_no_conv1d(model: nn.Module, policy: str) -> None:
    """Refuse transformers' Conv1D under a policy that picks linear layers (module doc)."""
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers"):
            raise UserError(
                f"{type(model).__name__} computes {name} with transformers' Conv1D (weight "
                f"stored [in, out]), which policy {policy!r} does not treat as a linear layer; "
                "wrap the model in qtrain.models.hf.HFCausalLM(model), which converts every "
                "Conv1D to an equivalent nn.Linear"
            )


def _weights_of(model: nn.Module, layer_types: tuple[type, ...]) -> set[int]:
    """ids of the `weight` parameters of every submodule of one of `layer_types`."""
    return {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, layer_types) and getattr(module, "weight", None) is not None
    }


def quantized_parameter_names(model: nn.Module, policy: str = "conv") -> list[str]:
    """Names (as in `model.named_parameters()`, each shared parameter once) of the trainable
    parameters the policy quantizes, in the model's parameter order."""
    check_policy(policy)
    if policy == "all":
        chosen = {id(p) for p in model.parameters()}
    elif policy == "linear":
        _check_no_conv1d(model, policy)
        chosen = _weights_of(model, (nn.Linear,)) - full_precision_parameters(model)
    else:
        layer_types: tuple[type, ...] = (nn.modules.conv._ConvNd,)
        if policy == "conv+linear":
            _check_no_conv1d(model, policy)
            layer_types += (nn.Linear,)
        chosen = _weights_of(model, layer_types)
    names = [name for name, p in model.named_parameters() if id(p) in chosen and p.requires_grad]
    return names[1:] if policy == "conv-except-first" else names


def split_parameters(
    model: nn.Module, policy: str = "conv"
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(quantized, full-precision) trainable parameters of `model` under `policy`; a shared
    parameter appears once, in one of the two lists."""
    chosen = set(quantized_parameter_names(model, policy))
    quantized, full = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (quantized if name in chosen else full).append(p)
    return quantized, full
