"""Where a run computes: the device it is given by name, and the precision of activations.

Device and dtype are chosen here, at the edge; the library code below follows its inputs.

``amp = "auto"`` is resolved once, when a run is created, to what this machine computes fast:
"bf16" on CUDA with bf16 support and on CPUs with native bf16 (AVX-512 BF16 or AMX that oneDNN
may use under ONEDNN_MAX_CPU_ISA, `qtrain.base.cpu_isa`), "off" (float32) elsewhere, AVX-512
without BF16 included: oneDNN emulates bf16 there, slower than float32. The resolved value is
what the run records in config.toml and its checkpoint, compares on resume and exports, so a
run's precision never changes with the machine it is resumed or evaluated on: a run that asks
for "auto" again there takes the recorded value (`resolve_amp` with the saved config). Runs made
before "auto" was resolved recorded the word itself, which then meant bf16 on CUDA and float32
on the CPU (`resolve_saved_amp`).
"""

from __future__ import annotations

import contextlib

import torch

from qtrain.base import cpu_isa
from qtrain.base.errors import UserError
from qtrain.train.config import RunConfig


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU does not)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 arithmetic is native: CUDA with bf16 support, or a CPU with AVX-512
    BF16 or AMX that oneDNN may use (`qtrain.base.cpu_isa`: limited by ONEDNN_MAX_CPU_ISA
    like the kernels it picks; AVX-512 without BF16 emulates bf16 and does not count)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_isa.has_native_bf16()


def resolve_amp(config: RunConfig, device: torch.device, saved: dict | None = None) -> RunConfig:
    """`config` with ``amp = "auto"`` replaced by the precision its run computes in: the one
    the run folder's `saved` config records when there is one (auto is resolved once, when
    the run is created, so a run resumed or read back on another machine keeps it), else
    "bf16" where `native_bf16(device)` and "off" elsewhere. An explicit "off" or "bf16" is
    kept, and compared with the saved one like any other setting."""
    if config.amp != "auto":
        return config
    if saved is not None:
        return config.replace(amp=resolve_saved_amp(saved, device)["amp"])
    return config.replace(amp="bf16" if native_bf16(device) else "off")


def resolve_saved_amp(values: dict, device: torch.device) -> dict:
    """A saved config dict with the amp it ran with: "auto" recorded by a run made before
    auto was resolved meant bf16 on CUDA and float32 on the CPU."""
    if values.get("amp", "auto") != "auto":
        return values
    return {**values, "amp": "bf16" if device.type == "cuda" else "off"}


def set_tf32(device: torch.device, amp: str) -> None:
    """On CUDA, TF32 matmuls and convolutions (10-bit mantissa inputs) exactly when the run
    asked for reduced precision: amp "off" means float32 arithmetic, so TF32 off; "bf16" means
    bf16 activations, so TF32 for what runs in float32 anyway. PyTorch's own defaults differ
    between matmul (off) and cuDNN (on), so both are set explicitly. Nothing on the CPU."""
    if device.type == "cuda":
        reduced = amp != "off"
        torch.backends.cuda.matmul.allow_tf32 = reduced
        torch.backends.cudnn.allow_tf32 = reduced


def autocast_context(device: torch.device, amp: str):
    """bf16 autocast for 'bf16'; for the 'auto' of a run made before it was resolved, on CUDA
    only (`resolve_saved_amp`); else nothing.

    Only activations run in bf16: parameters, BC's latent w_r and optimizer moments stay fp32.
    """
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def slow_bf16_note(device: torch.device, amp: str, kept: str | None = None) -> str | None:
    """A one-line note when bf16 autocast runs on a CPU without native bf16 support
    (AVX-512 BF16 or AMX, `native_bf16`): it still computes the same, but emulated, slower
    than float32. A new run is told that float32 is faster; a run that keeps the precision it
    began with is told what it `kept` doing in it ("continues" after a resume, "is evaluated"
    by `qtrain eval`). None otherwise."""
    if device.type != "cpu" or amp != "bf16" or native_bf16(device):
        return None
    if kept:
        return (
            f"note: this run {kept} in bf16, the precision it trained in, but this CPU has no "
            "native bf16 (AVX-512 BF16 or AMX), so that is slower here than float32"
        )
    return (
        "note: this CPU has no native bf16 (AVX-512 BF16 or AMX), so amp=bf16 runs slower "
        "than float32; amp=off is faster here"
    )
