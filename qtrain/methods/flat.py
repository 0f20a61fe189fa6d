"""One flat buffer behind many parameters, and noticing when a model moves off it.

The quantized optimizer keeps every quantized parameter as a view into one flat tensor, so a
step rounds, clips and counts flips in one vectorised call. `model.to(device)`, `.double()`,
`.half()` or `.to(memory_format=...)` replace each `param.data` with a new tensor and leave the
buffer behind; `moved` notices that from pointers, devices, dtypes and strides alone (no
reading of values), so the optimizer can follow or refuse before it rounds a stale copy.
"""

from __future__ import annotations

import torch
from torch import nn

from qtrain.base.errors import UserError


def flat_views(params: list[nn.Parameter], flat: torch.Tensor) -> list[torch.Tensor]:
    """Views into `flat` with each parameter's shape and strides (dense, non-overlapping)."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].as_strided(p.shape, p.stride()))
        offset += p.numel()
    return views


def is_dense(p: torch.Tensor) -> bool:
    """True when p's elements fill its storage span exactly once (any dimension order)."""
    expected = 1
    for size, stride in sorted(zip(p.shape, p.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def check_dense(p: torch.Tensor) -> None:
    if not is_dense(p):
        raise UserError(
            "a quantized parameter must be a dense tensor (no overlapping or sliced storage); "
            "call .contiguous() on it before building the optimizer"
        )


def moved(params: list[nn.Parameter], views: list[torch.Tensor]) -> bool:
    """True when some parameter no longer is its view (other memory, device, dtype or layout)."""
    return any(
        p.data_ptr() != v.data_ptr()
        or p.device != v.device
        or p.dtype != v.dtype
        or p.stride() != v.stride()
        for p, v in zip(params, views, strict=True)
    )


def check_widening(old: torch.dtype, new: torch.dtype) -> None:
    """Refuse a cast that cannot hold every `old` value exactly (float32 → float16, ...)."""
    if torch.promote_types(old, new) != new:
        raise UserError(
            f"the model's quantized parameters were cast from {old} to {new} after the "
            "optimizer was built, which would round the optimizer's float state; cast the "
            "model before calling methods.create"
        )


def generator_on(old: torch.Generator, device: torch.device) -> torch.Generator:
    """`old` itself when it lives on `device`, else a generator there seeded from one draw of it.

    Generator states of different device types are different algorithms (Mersenne Twister on
    the CPU, Philox on CUDA), so a stream cannot be carried over bit for bit; one 63-bit draw
    from the old stream seeds the new one, which keeps the run reproducible from its seed.
    """
    if old.device == device or (old.device.type == device.type == "cpu"):
        return old
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=old, device=old.device))
    return torch.Generator(device=device).manual_seed(seed)


class FlatWork:
    """Named scratch buffers shaped like the flat buffer of `params`, reused from step to step,
    with the parameters' views into each made once.

    On a small network a step is short, and a fresh tensor per elementwise pass over the
    quantized weights (allocation and page faults) or a fresh set of views per pass shows in
    it; these live as long as the flat buffer's size, dtype and device do (a model move gets
    new ones on first use).
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self._params = params
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[str, list[torch.Tensor]] = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Buffer `name` with like's shape and device and `dtype` (like's by default); its
        contents are whatever the last user left there."""
        dtype = dtype or like.dtype
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape != like.shape
            or buffer.dtype != dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[name] = torch.empty_like(like, dtype=dtype)
            self._views[name] = flat_views(self._params, buffer)
        return buffer

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The parameters' views into `flat`: kept for these buffers, made for any other."""
        for name, buffer in self._buffers.items():
            if buffer is flat:
                return self._views[name]
        return flat_views(self._params, flat)
