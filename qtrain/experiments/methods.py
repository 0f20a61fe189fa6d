"""The five method rows of Table 1 and how each is configured.

Big-batch SR-ADAM is SR-ADAM with a larger minibatch (docs/paper.md §2: 1024 instead of 128 for
VGG-9, VGG-BC and ResNet-56; 512 for WRN-56-2 and ResNet-18); every other setting is shared.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodRow:
    label: str  # as printed in tables and legends
    method: str  # preset name for qtrain.methods.create
    big_batch: bool = False

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" ", "-")


PAPER_METHODS = (
    MethodRow("FP-ADAM", "fp-adam"),
    MethodRow("BC-ADAM", "bc-adam"),
    MethodRow("big-batch SR-ADAM", "sr-adam", big_batch=True),
    MethodRow("SR-ADAM", "sr-adam"),
    MethodRow("R-ADAM", "r-adam"),
)
LABEL_ORDER = [m.label for m in PAPER_METHODS]
