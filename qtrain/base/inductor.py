"""torch.compile with inductor's on-disk cache kept apart per vector instruction set.

Inductor stores what it compiles in a cache on disk (``TORCHINDUCTOR_CACHE_DIR``, by default
``<tmp>/torchinductor_<user>``), shared by every process of the user. Its key for a compiled
graph (torch 2.13) does not hold the vector instruction set the C++ was generated for, which
inductor picks from the CPU and from ``ATEN_CPU_CAPABILITY``. So a process run under the AVX2
stand-in of docs/speed.md (``ATEN_CPU_CAPABILITY=avx2``) stores loops that step 8 floats at a
time, and a later process on the same AVX-512 machine without the variable finds them under
the same key and builds them with AVX-512 flags, where a vector holds 16 floats: its loops
write past the ends of their buffers, and the run dies mid-training ("double free or
corruption", seen with BC's fused rounding step on the GPT). The other way round, loops that
step 16 floats built for 8-float vectors skip half of each stride, silently: 496 of 1,000
elements wrong in tests/test_inductor_cache.py without this module.

Every compile in qtrain goes through `torch_compile`, which first points inductor at a
subfolder of the cache named after the instruction set this process generates code for
(``…/torchinductor_<user>/isa-avx512-avx512_vnni-amx_tile``, ``…/isa-avx2``), under the
user's own ``TORCHINDUCTOR_CACHE_DIR`` when one is set. Processes of one instruction set share
their compiled kernels as before; processes of two never read each other's.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
_PREFIX = "isa-"


def vector_isa() -> str:
    """The vector instruction set inductor generates CPU code for in this process, as a folder
    name: its words joined by '-' ("avx2", "avx512-avx512_vnni-amx_tile"; "none" without one)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    name = re.sub(r"[^A-Za-z0-9_]+", "-", str(isa)).strip("-") if isa else ""
    return name or "none"


def cache_of_this_isa() -> Path:
    """Point inductor's cache at the subfolder of this process's instruction set (module
    doc) and return it. The base is the user's TORCHINDUCTOR_CACHE_DIR, else inductor's
    default; a path that already names one of these subfolders (set by an earlier call, or
    inherited from a parent process) counts as its parent, so they never nest."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = Path(os.environ.get(CACHE_VARIABLE) or default_cache_dir()).absolute()
    if base.name.startswith(_PREFIX):
        base = base.parent
    folder = base / f"{_PREFIX}{vector_isa()}"
    os.environ[CACHE_VARIABLE] = str(folder)
    return folder


def torch_compile(fn: Callable, **options) -> Callable:
    """torch.compile(fn, **options) with the cache of this instruction set (module doc)."""
    cache_of_this_isa()
    return torch.compile(fn, **options)


def compiler_found(device: torch.device) -> bool:
    """Whether inductor has what it compiles with on `device`: a C++ compiler on the CPU
    (inductor's configured one), Triton on CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    if device.type != "cpu":
        return False
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    return any(name is not None and shutil.which(name) for name in names)
