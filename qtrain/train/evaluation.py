"""Evaluation of a model over a loader: mean cross-entropy and top-1 error, under TTA."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from qtrain.train.devices import autocast_context
from qtrain.train.distributed import DistributedContext
from qtrain.train.tta import tta_logits


@torch.no_grad()
def evaluate(
    model,
    loader,
    device: torch.device,
    amp: str = "off",
    dist: DistributedContext | None = None,
    tta: str = "none",
) -> dict:
    """Test loss and top-1 error (%) of `model` over every batch of `loader`.

    The logits are those of test-time augmentation `tta` (`qtrain.train.tta`). The loss is the
    mean plain cross-entropy per prediction, whatever the training loss was: per image, or per
    token for a language model (logits [B, T, V] against y [B, T]). Under `dist` each rank
    evaluates its shard of every batch and the sums are added up.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for x, y in loader.epoch(0):
        with autocast_context(device, amp):
            logits = tta_logits(model, x, tta).flatten(0, -2)  # [N, V]: per image or token
        y = y.flatten()
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        wrong += (logits.argmax(-1) != y).sum()
        seen += y.numel()
    model.train(was_training)
    if dist is not None:
        loss_sum, wrong = dist.all_sum(loss_sum), dist.all_sum(wrong)
        seen = int(dist.all_sum(torch.tensor(seen, device=device)))
    return {"loss": float(loss_sum) / seen, "error": 100.0 * float(wrong) / seen}
