"""The quantized optimizer's saved state, and what it must agree on with its loader.

`quantization_state` is everything beyond the base optimizer's own state: w_r (BC), m and v
(Bop, Bop2), the scales, the rounding generator and the flip counters. It also records the
method, grid, scale, stochastic-BC setting, source of SR's uniforms, number of quantized
weights and the device type of the generator; each differs from the loading optimizer only
by a user's mistake (another method, model or setting), which `check_saved_settings` names
with its fix.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError
from qtrain.quant import Grid


def quantization_state(opt) -> dict:
    """The state of `opt` (a QuantizedOptimizer) that its base optimizer does not hold."""

    def saved(name: str) -> torch.Tensor | None:
        return opt._buffers[name].clone() if name in opt._buffers else None

    generator = opt.generator
    return {
        "mode": opt.mode,
        "grid": opt.grid.to_dict(),
        "scale": opt.scale,
        "bc_stochastic": opt.bc_stochastic,
        "sr_uniforms": opt.sr_uniforms,
        "num_quantized": opt.num_quantized,
        "latent": saved("latent"),
        "m": saved("m"),
        "v": saved("v"),
        "scales": [s.clone() for s in opt._scales],
        "generator": None if generator is None else generator.get_state(),
        "generator_device": None if generator is None else generator.device.type,
        "flips": opt.flips.state(),
    }


def split_saved(state_dict) -> tuple[dict, dict]:
    """(base state, quantization state) of a saved state; ValueError for anything else."""
    try:
        return state_dict["base"], state_dict["quantization"]
    except (KeyError, TypeError):
        raise UserError(
            "this optimizer state was not saved by a qtrain QuantizedOptimizer; "
            "load a checkpoint written by qtrain"
        ) from None


def check_saved_settings(opt, q: dict) -> None:
    """Refuse a saved state `q` whose method, grid, scale, settings or size differ from `opt`'s."""
    if q["mode"] != opt.mode or Grid.from_dict(q["grid"]) != opt.grid:
        raise UserError(
            f"the saved optimizer state is for {q['mode']} on "
            f"{Grid.from_dict(q['grid']).describe()}, not {opt.mode} on "
            f"{opt.grid.describe()}; resume with the method and grid it was trained with"
        )
    saved_scale = q.get("scale", "none")
    if saved_scale != opt.scale:
        raise UserError(
            f"the saved optimizer state was trained with scale {saved_scale!r}, not "
            f"{opt.scale!r}; resume with the scale it was trained with"
        )
    if bool(q.get("bc_stochastic", False)) != opt.bc_stochastic:
        raise UserError(
            f"the saved optimizer state was trained with bc_stochastic="
            f"{bool(q.get('bc_stochastic'))}, not {opt.bc_stochastic}; resume with the "
            "setting it was trained with"
        )
    saved_uniforms = q.get("sr_uniforms", "torch")
    if saved_uniforms != opt.sr_uniforms:
        raise UserError(
            f"the saved optimizer state was trained with sr_uniforms={saved_uniforms!r}, not "
            f"{opt.sr_uniforms!r}; resume with the setting it was trained with"
        )
    if q["num_quantized"] != opt.num_quantized:
        raise UserError(
            f"the saved optimizer state quantizes {q['num_quantized']} weights but this "
            f"model has {opt.num_quantized}; resume with the same model and policy"
        )
    saved_device = q.get("generator_device")
    if opt.generator is not None and saved_device not in (None, opt.generator.device.type):
        raise UserError(
            f"the saved rounding generator ran on a {saved_device} device but this optimizer "
            f"rounds on {opt.generator.device.type}, and their random states do not "
            f"convert; resume with the model on a {saved_device} device"
        )
