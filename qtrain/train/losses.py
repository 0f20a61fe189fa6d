"""The training loss: cross-entropy, optionally with label smoothing.

With K classes, logits z, p = softmax(z) and smoothing ε ∈ [0, 1), the target of an image of
class y is the distribution q = (1 − ε)·onehot(y) + ε/K, and the loss is

    L(z, y) = −Σ_k q_k log p_k = (1 − ε)·(−log p_y) + ε·(1/K)·Σ_k (−log p_k)

averaged over the batch (Szegedy et al. 2016, "Rethinking the Inception architecture"; ε = 0.2
in cifar10-airbench). ε = 0 is plain cross-entropy. Only training uses it: evaluation always
reports plain cross-entropy, so test and validation losses of runs with and without smoothing
compare directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_label_smoothing(value: float) -> float:
    """`value` when it is a valid ε (a finite number in [0, 1)), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(
            f"label_smoothing must be in [0, 1) (0 turns it off, airbench uses 0.2), got {value}"
        )
    return float(value)


def training_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """L(z, y) of the module docstring, averaged over rows: logits [N, K], y int64 [N]."""
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
