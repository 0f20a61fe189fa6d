"""Where a run computes: the device it is given by name, and the precision of activations.

Device and dtype are chosen here, at the edge; the library code below follows its inputs.
"""

from __future__ import annotations

import contextlib

import torch

from qtrain.base.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The device named by the config: 'auto' (CUDA when available, else the CPU), 'cpu' or
    'cuda[:N]'; ValueError when it is unknown or CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} was requested but CUDA is not available; use {{device}}",
            device="device=cpu",
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast on CUDA ('auto' or 'bf16'); explicit 'bf16' also on CPU; else nothing.

    Only activations run in bf16: parameters, BC's latent w_r and optimizer moments stay fp32.
    """
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def slow_bf16_note(device: torch.device, amp: str) -> str | None:
    """A one-line note when bf16 autocast is asked for on a CPU without native bf16 support
    (AVX-512 BF16 or AMX, as oneDNN reports it): it still computes the same, but emulated,
    slower than float32. None otherwise."""
    if device.type != "cpu" or amp != "bf16" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return (
        "note: this CPU has no native bf16 (AVX-512 BF16 or AMX), so amp=bf16 runs slower "
        "than float32; amp=off is faster here"
    )
