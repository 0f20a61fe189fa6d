"""Where stochastic rounding's uniforms come from: a generator's stream or a counter hash.

Q_s needs one uniform r ∈ [0, 1) per weight and step (`round_stochastic`). Two sources:

- "torch": `torch.rand` on the run's rounding generator, one draw of the buffer's shape.
  On a CPU that is a serial Mersenne-Twister loop, which for the GPT of docs/speed.md §7
  (786,432 quantized weights) takes longer than the compiled rounding step itself.
- "counter": r_i = ⌊h_i / 2⁸⌋ · 2⁻²⁴ with h_i = mix(mix(i ⊕ k₀) ⊕ k₁), a hash of the
  weight's index i in the flat buffer under two 32-bit keys (k₀, k₁) drawn from the same
  generator once a step. Each r_i depends on i alone, so a compiled kernel computes it where it
  uses it, in the loop that rounds: nothing is drawn serially, stored or read back. This is
  the counter-based design of Philox and of GPU kernels' in-register randomness (Salmon et al.,
  "Parallel random numbers: as easy as 1, 2, 3", SC 2011), with a cheaper mixing function.

`mix` is a 32-bit xorshift-multiply finaliser, x ← x ⊕ (x ≫ 16); x ← x·0x21f0aaad;
x ← x ⊕ (x ≫ 15); x ← x·0x735a2d97; x ← x ⊕ (x ≫ 15) (mod 2³², logical shifts): a bijection of
32-bit words in which every input bit flips each output bit with probability close to ½ (the
constants found with C. Wellons' hash prospector, the finaliser of the common splitmix32).
Applied twice with a key between, two steps' streams are the images of two unrelated
permutations, not shifts of one sequence.

The arithmetic is int32 with two's-complement wrap-around (what ATen's and inductor's
vectorised multiplies do, and Triton's); shifts are made logical by masking the sign bits the
arithmetic shift copies in. tests/test_uniforms.py checks eager ATen against exact uint32
arithmetic in Python and inductor's C++ against eager ATen; tests/test_fused_quant.py checks
Triton's kernel against ATen's on a GPU (benchmarks/gpu_check.sh runs it).

24 bits of r, as `torch.rand` gives a float32, so P(r < p) = ⌈p·2²⁴⌉/2²⁴ and Q_s's bias is
below 2⁻²⁴ of a spacing. Keys are the only state: the generator that draws them is saved in
checkpoints as before, so a resumed run continues the same stream. A buffer of more than
2³¹ − 1 weights has no distinct int32 index for each: `check_size` refuses it.
"""

from __future__ import annotations

import torch

from qtrain.base.errors import UserError

SOURCES = ("torch", "counter")
_MULTIPLIERS = (0x21F0AAAD, 0x735A2D97)  # both < 2³¹: plain int32 constants
MAX_NUMEL = 2**31 - 1


def check_source(value: str) -> str:
    """`value` when it names a source; one sentence naming them otherwise."""
    if value not in SOURCES:
        raise UserError(f"sr_uniforms must be one of {', '.join(SOURCES)}, got {value!r}")
    return value


def check_size(numel: int) -> None:
    """Refuse a buffer too large for distinct int32 counters."""
    if numel > MAX_NUMEL:
        raise UserError(
            f"sr_uniforms = 'counter' indexes at most {MAX_NUMEL} quantized weights, this "
            f"model has {numel}; use sr_uniforms = 'torch'"
        )


def _shift_right(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """The logical shift x ≫ bits of int32 words into `out` (ATen's is arithmetic: the sign
    bits it copies in are masked off)."""
    torch.bitwise_right_shift(x, bits, out=out)
    return out.bitwise_and_((1 << (32 - bits)) - 1)


def mix_(x: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of the module doc (a bijection), in place on the int32 words x,
    with `work` (x's shape) as scratch: in place, the eager form makes about half the passes
    over memory of a functional one."""
    x.bitwise_xor_(_shift_right(x, 16, work)).mul_(_MULTIPLIERS[0])
    x.bitwise_xor_(_shift_right(x, 15, work)).mul_(_MULTIPLIERS[1])
    return x.bitwise_xor_(_shift_right(x, 15, work))


def draw_keys(generator: torch.Generator) -> torch.Tensor:
    """A step's keys (k₀, k₁): two int32 words drawn from `generator`, on its device."""
    keys = torch.randint(-(2**31), 2**31, (2,), generator=generator, device=generator.device)
    return keys.to(torch.int32)


def counter_uniforms(
    keys: torch.Tensor, numel: int, dtype: torch.dtype, start: int = 0
) -> torch.Tensor:
    """r_i = ⌊mix(mix(i ⊕ k₀) ⊕ k₁) / 2⁸⌋ · 2⁻²⁴ for i = start … start + numel − 1, in `dtype`
    on the keys' device: uniforms on the 2²⁴ multiples of 2⁻²⁴ in [0, 1). A slice of the
    flat buffer's uniforms is those of its indices: `start` is the slice's offset."""
    h = torch.arange(start, start + numel, dtype=torch.int32, device=keys.device)
    work = torch.empty_like(h)
    mix_(h.bitwise_xor_(keys[0]), work)
    mix_(h.bitwise_xor_(keys[1]), work)
    return _shift_right(h, 8, work).to(dtype).mul_(2.0**-24)
