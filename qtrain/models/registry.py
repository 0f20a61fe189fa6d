"""Model registry: every selectable network is registered by name (timm style).

A factory has the signature ``factory(num_classes, width, in_channels) -> nn.Module``; its
docstring's first line is the model's one-line description. `create` scales every layer's
channel count by ``width`` so the paper's architectures can be trained at reduced cost. A model
registered with ``binary_activations=True`` also takes ``activations="float"|"binary"`` as a
keyword (`qtrain.models.activations`); `create` refuses "binary" for every other model.

A text model (``modality="text"``, the GPT) reads token ids instead of images: its factory is
``factory(vocab_size, **options)`` with the size options it declares (``options``), its
``input_size`` is its default context length in tokens, and the image-only settings (width,
in_channels, binary activations) are refused for it with a sentence. Its checkpoint record
stores the attributes of its ``config`` named by ``record_options`` (its ``options`` unless
it declares others), and a rebuild passes them back to the factory. A text model whose
default context depends on its options declares ``context(options) -> tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from qtrain.base.errors import UserError
from qtrain.base.names import unknown_name

from .activations import check_activations

Factory = Callable[..., nn.Module]  # (num_classes, width, in_channels[, activations=, **options])


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs to know about a registered model before building it."""

    name: str
    description: str
    input_size: int  # default square input side in pixels (32 for CIFAR, 224 for ImageNet)
    dataset: str  # the data set the model is meant for (a `qtrain.data` name or "imagenet")
    binary_activations: bool = False  # accepts activations="binary"
    modality: str = "image"  # "image" or "text" (token ids in, next-token logits out)
    options: tuple[str, ...] = ()  # options the factory takes (sizes of a text model)
    # what a checkpoint records of a text model (attributes of its `config`), when not `options`
    record_options: tuple[str, ...] | None = None
    context: Callable[[dict], int] | None = None  # default context from the options

    @property
    def stored_options(self) -> tuple[str, ...]:
        """The options a checkpoint's model record holds (`record_options`, else `options`)."""
        return self.options if self.record_options is None else self.record_options

    def default_context(self, options: dict) -> int:
        """Tokens a text model reads by default: `context(options)`, else `input_size`."""
        return self.input_size if self.context is None else self.context(options)


_FACTORIES: dict[str, Factory] = {}
_INFOS: dict[str, ModelInfo] = {}


def register_model(
    name: str,
    *,
    input_size: int = 32,
    dataset: str = "cifar10",
    binary_activations: bool = False,
    modality: str = "image",
    options: tuple[str, ...] = (),
    record_options: tuple[str, ...] | None = None,
    context: Callable[[dict], int] | None = None,
):
    """Decorator registering ``factory`` under ``name``; a duplicate name is a programming error."""

    def decorate(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise UserError(f"model name {name!r} is already registered; pick another name")
        doc = (factory.__doc__ or name).strip().splitlines()[0]
        _FACTORIES[name] = factory
        _INFOS[name] = ModelInfo(
            name, doc, input_size, dataset, binary_activations, modality, tuple(options),
            None if record_options is None else tuple(record_options), context,
        )  # fmt: skip
        return factory

    return decorate


def list_models(modality: str | None = None) -> list[str]:
    """Names of the registered models, sorted; only those reading `modality` when given."""
    return sorted(n for n in _FACTORIES if modality is None or _INFOS[n].modality == modality)


def list_binary_activation_models() -> list[str]:
    """Names of the models that accept activations="binary", sorted."""
    return [name for name in list_models() if _INFOS[name].binary_activations]


def _check_name(name: str) -> None:
    if name in _FACTORIES:
        return
    raise unknown_name("model", name, list_models())


def _check_activations(name: str, activations: str) -> None:
    check_activations(activations)
    if activations == "binary" and not _INFOS[name].binary_activations:
        raise UserError(
            f"model {name!r} does not support binary activations; use activations='float' "
            f"or one of {', '.join(list_binary_activation_models())}"
        )


def model_info(name: str) -> ModelInfo:
    """Description, default input size and intended data set of a registered model."""
    _check_name(name)
    return _INFOS[name]


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``, rounded, never below 1."""
    return max(1, round(channels * width))


def create(
    name: str,
    num_classes: int = 10,
    width: float = 1.0,
    in_channels: int = 3,
    activations: str = "float",
    options: dict | None = None,
) -> nn.Module:
    """Build the registered model ``name`` with fresh (PyTorch default) initialisation.

    ``activations="binary"`` makes the input of every convolution but the first sign(x)
    (`qtrain.models.activations`); the parameters, and so the quantization policy, are the
    same as with "float". ``options`` are the model's own settings (its `ModelInfo.options`:
    a text model's sizes, speednet's `norm_after_pool`; None values mean the model's
    defaults); for a text model ``num_classes`` is its vocabulary size.
    """
    _check_name(name)
    options = {key: value for key, value in (options or {}).items() if value is not None}
    if _INFOS[name].modality == "text":
        return _create_text_model(name, num_classes, width, in_channels, activations, options)
    unknown = sorted(set(options) - set(_INFOS[name].options))
    if unknown:
        takes = ", ".join(_INFOS[name].options) or "none"
        raise UserError(
            f"model {name!r} has no option {', '.join(unknown)} (its options: {takes}); "
            "leave it unset"
        )
    _check_activations(name, activations)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width):
        raise UserError(f"model width must be a finite number > 0, got {width!r}")
    if width <= 0:
        raise UserError(f"model width must be > 0 (1.0 is the paper's size), got {width}")
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{label} must be a positive integer, got {value!r}")
    if _INFOS[name].binary_activations:
        options["activations"] = activations
    return _FACTORIES[name](num_classes, float(width), in_channels, **options)


def _create_text_model(
    name: str, vocab_size: int, width: float, in_channels: int, activations: str, options: dict
) -> nn.Module:
    """A text model: the image-only settings must keep their neutral values."""
    info = _INFOS[name]
    if width != 1.0:
        raise UserError(
            f"model {name!r} reads text and has no width; size it with "
            f"{', '.join(info.options)} and leave width at 1.0"
        )
    if activations != "float":
        raise UserError(
            f"model {name!r} does not support activations={activations!r}; binary activations "
            "apply to the image models only, leave activations='float'"
        )
    if in_channels not in (1, 3):  # 1: a stream of ids; 3: the image default of `create`
        raise UserError(f"model {name!r} reads token ids and takes no in_channels setting")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise UserError(f"num_classes (the vocabulary size) must be a positive integer, got "
                         f"{vocab_size!r}")  # fmt: skip
    return _FACTORIES[name](vocab_size, **options)
