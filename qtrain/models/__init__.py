"""The paper's networks (VGG-9, VGG-BC, ResNet-56, WRN-56-2, ResNet-18) tiny test models, a
GPT language model, and Hugging Face transformers causal LMs (`hf`, the `hf` extra).

All are plain ``nn.Module``s built from ``nn.Conv2d``, ``nn.Linear`` and ``nn.BatchNorm*``;
select one by name with `create`. Importing the model files registers them.
"""

from . import (  # noqa: F401  (registration)
    gpt,
    hf,
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
