"""Training methods as optimizers over quantized parameters (docs/paper.md §2)."""

from qtrain.methods.optimizer import MODES, QuantizedOptimizer
from qtrain.methods.policy import POLICIES, quantized_parameter_names, split_parameters
from qtrain.methods.presets import (
    METHODS,
    MethodSpec,
    check_settings,
    create,
    list_methods,
    parse_method,
    rademacher_,
)
from qtrain.methods.scales import SCALES

__all__ = [
    "METHODS",
    "MODES",
    "POLICIES",
    "SCALES",
    "MethodSpec",
    "QuantizedOptimizer",
    "check_settings",
    "create",
    "list_methods",
    "parse_method",
    "quantized_parameter_names",
    "rademacher_",
    "split_parameters",
]
