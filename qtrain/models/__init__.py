"""The paper's networks (VGG-9, VGG-BC, ResNet-56, WRN-56-2, ResNet-18) tiny test models, and
a GPT language model.

All are plain ``nn.Module``s built from ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm*``;
select one by name with `create`. Importing the model files registers them.
"""

from . import (  # noqa: F401  (registration)
    gpt,
    resnet_cifar,
    resnet_imagenet,
    speednet,
    tiny,
    vgg,
)
from .registry import (
    ModelInfo,
    create,
    list_binary_activation_models,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "ModelInfo",
    "create",
    "list_binary_activation_models",
    "list_models",
    "model_info",
    "register_model",
]
