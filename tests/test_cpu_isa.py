"""What counts as native on this CPU (qtrain.base.cpu_isa): AVX-512 BF16 or AMX, each only
where ONEDNN_MAX_CPU_ISA lets oneDNN use it; AVX-512 without BF16, where oneDNN accepts bf16
but emulates it, is not native. The CPU's instructions are patched, so every kind of CPU is
checked on whichever one runs the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qtrain.base import cpu_isa


@pytest.fixture
def cpu(monkeypatch):
    """cpu(avx512_bf16=..., amx=..., cap=...): this CPU with those instructions, oneDNN capped
    at `cap` (None: no cap)."""

    def make(avx512_bf16: bool, amx: bool, cap: str | None = None) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        # what oneDNN says of bf16 support, wrongly taken for speed once: yes on AVX-512
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)

    return make


@pytest.mark.parametrize(
    "avx512_bf16, amx, cap, native, amx_usable",
    [
        (True, True, None, True, True),  # Sapphire Rapids and later: AMX
        (True, False, None, True, False),  # Zen 4, Zen 5, Cooper Lake: AVX-512 BF16
        (False, False, None, False, False),  # Skylake to Ice Lake: AVX-512, bf16 emulated
        (True, True, "AVX2", False, False),  # the AVX2 stand-in
        (True, True, "AVX512_CORE", False, False),  # a stand-in for AVX-512 without BF16
        (True, True, "avx512_core_bf16", True, False),  # caps are case-insensitive
        (True, True, "AVX512_CORE_AMX", True, True),
        (True, True, "AVX10_1_512", True, False),
        (True, True, "ALL", True, True),
        (True, True, "DEFAULT", True, True),
        (True, True, "", True, True),  # set but empty: no cap
        (True, True, "avx2", False, False),  # oneDNN reads the name in any case
        (True, True, "AVX3", True, True),  # a name oneDNN does not know: it ignores the cap
    ],
)
def test_native_bf16_and_amx_count_only_where_the_cpu_has_them_and_onednn_may_use_them(
    cpu, avx512_bf16, amx, cap, native, amx_usable
):
    cpu(avx512_bf16, amx, cap)
    assert cpu_isa.has_native_bf16() is native
    assert cpu_isa.has_amx() is amx_usable


def test_the_real_check_follows_an_isa_cap_in_a_fresh_process():
    """The stand-ins set the cap in the environment of a new process, as a user does: under
    AVX512_CORE and AVX2 (in any case) nothing counts, whatever this CPU has, and `auto`
    (`devices.native_bf16`) picks float32 as it would on such a CPU."""
    code = ("import torch; from qtrain.base import cpu_isa; from qtrain.train import devices; "
            "print(devices.native_bf16(torch.device('cpu')), cpu_isa.has_amx(), "
            "torch.ops.mkldnn._is_mkldnn_bf16_supported())")  # fmt: skip
    for cap in ("AVX2", "avx2", "AVX512_CORE"):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=120)  # fmt: skip
        native, amx, onednn = out.stdout.split()
        assert (native, amx) == ("False", "False"), cap
        if cap.upper() == "AVX2":  # oneDNN's own check agrees (on AVX-512 it says yes)
            assert onednn == "False", cap
