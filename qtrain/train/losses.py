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

import torch
import torch.nn.functional as F

from qtrain.train.checks import check_fraction


def check_label_smoothing(value: float) -> float:
    """`value` when it is a valid ε (a finite number in [0, 1)), else ValueError."""
    return check_fraction("label_smoothing", value, "0 turns it off, airbench uses 0.2")


def training_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0):
    """L(z, y) of the module docstring, averaged over rows: logits [N, K], y int64 [N]."""
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
