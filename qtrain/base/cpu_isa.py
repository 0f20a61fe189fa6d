"""What this CPU computes natively, as oneDNN's kernels will use it.

bf16 is native where the CPU has AVX-512 BF16 (a bf16 dot product accumulated in float32) or
AMX tiles: oneDNN's bf16 convolutions and matrix products then run on those instructions.
oneDNN also accepts bf16 on AVX-512 without BF16 (Skylake to Ice Lake servers; PyTorch's
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` says yes there) and computes it by emulation:
with oneDNN capped at those kernels (ONEDNN_MAX_CPU_ISA=AVX512_CORE on an AMD EPYC of Zen 5)
the speedrun's step ran 2.56× slower in bf16 than in float32
(`benchmarks/bench_speedrun_step.py`), so that does not count as native here.

ONEDNN_MAX_CPU_ISA caps the instruction sets oneDNN dispatches (the AVX2 stand-in of
docs/speed.md sets it to AVX2); a capability counts only where the cap allows it, as in
oneDNN's own kernels. The cap's names are oneDNN's, in any case: those at or above AVX-512
BF16 name BF16, FP16 (which includes it), AMX or AVX10 (`allows`); ALL, DEFAULT, no cap or a
name oneDNN does not know (which it ignores) allow everything.
"""

from __future__ import annotations

import os

import torch

# words in the names of oneDNN's ISAs that include AVX-512 BF16 (avx512_core_bf16,
# avx512_core_fp16, avx512_core_amx, avx512_core_amx_fp16, avx10_1_512, avx10_2_512, ...)
BF16_ISA_WORDS = ("BF16", "FP16", "AMX", "AVX10")


# the values of ONEDNN_MAX_CPU_ISA that oneDNN knows (the aliases of AVX10 included)
ONEDNN_ISAS = frozenset({
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
    "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL",
    "DEFAULT",
})  # fmt: skip


def onednn_isa_cap() -> str:
    """ONEDNN_MAX_CPU_ISA in capitals; "ALL" where unset, empty or a name oneDNN ignores."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in ONEDNN_ISAS else "ALL"


def allows(words: tuple[str, ...]) -> bool:
    """Whether oneDNN's cap lets it use an ISA whose name holds one of `words`."""
    cap = onednn_isa_cap()
    return cap in ("ALL", "DEFAULT") or any(word in cap for word in words)


def has_amx() -> bool:
    """AMX tiles that oneDNN may use: the CPU has them and the cap names an AMX ISA."""
    return torch.cpu._is_amx_tile_supported() and allows(("AMX",))


def has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX that oneDNN may use (module doc): where bf16 is faster than
    float32, not only supported."""
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported() and allows(BF16_ISA_WORDS)
    return avx512_bf16 or has_amx()
