"""Inductor's disk cache kept apart per vector instruction set (qtrain.base.inductor).

Without it, a process under the AVX2 stand-in (ATEN_CPU_CAPABILITY=avx2) and a later native one
on an AVX-512 machine share compiled graphs under one key, and the native one runs loops built
for 8-float vectors with 16-float ones, writing past its buffers.
"""

from __future__ import annotations

import os

import pytest
import torch

from qtrain.base import inductor
from qtrain.base.inductor import CACHE_VARIABLE, cache_of_this_isa, torch_compile, vector_isa
from qtrain.methods.fused import FusedSteps
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer


def isas() -> list[str]:
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    return [str(isa) for isa in valid_vec_isa_list()]


@pytest.fixture
def cache_base(tmp_path, monkeypatch):
    """A user's TORCHINDUCTOR_CACHE_DIR, restored afterwards (the functions set it)."""
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    return tmp_path / "cache"


def test_the_folder_names_the_instruction_set_that_aten_cpu_capability_selects(
    cache_base, monkeypatch
):
    if "avx2" not in isas() or len(isas()) < 2:
        pytest.skip("needs an x86 CPU with an instruction set beyond AVX2")
    native = cache_of_this_isa()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    stand_in = cache_of_this_isa()
    assert stand_in == cache_base / "isa-avx2"
    assert native.parent == cache_base and native != stand_in
    assert native.name == "isa-" + str(isas()[0]).replace(" ", "-")
    assert os.environ[CACHE_VARIABLE] == str(stand_in)


def test_calls_and_child_processes_never_nest_the_folders(cache_base):
    first = cache_of_this_isa()
    assert cache_of_this_isa() == first  # the variable now names first: its parent is the base
    assert first.parent == cache_base and first.name == f"isa-{vector_isa()}"


def test_without_a_cache_variable_the_folder_is_under_inductors_default(monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    folder = cache_of_this_isa()
    assert str(folder.parent) == os.path.abspath(default_cache_dir())
    assert os.environ[CACHE_VARIABLE] == str(folder)


class FakeIsa:
    """What inductor's pick_vec_isa returns: a name, and falsy when there is no vector ISA."""

    def __init__(self, name: str, valid: bool) -> None:
        self.name, self.valid = name, valid

    def __str__(self) -> str:
        return self.name

    def __bool__(self) -> bool:
        return self.valid


@pytest.mark.parametrize(
    "isa, folder",
    [(FakeIsa("avx512 avx512_vnni amx_tile", True), "avx512-avx512_vnni-amx_tile"),
     (FakeIsa("INVALID_VEC_ISA", False), "none")],
)  # fmt: skip
def test_an_instruction_set_becomes_one_folder_name(monkeypatch, isa, folder):
    monkeypatch.setattr("torch._inductor.cpu_vec_isa.pick_vec_isa", lambda: isa)
    assert vector_isa() == folder


@pytest.fixture
def compiles(cache_base, monkeypatch):
    """torch.compile replaced by a recorder of the cache folder at the time of each call."""
    seen: list[str | None] = []

    def record(fn, **options):
        seen.append(os.environ.get(CACHE_VARIABLE))
        return fn

    monkeypatch.setattr(torch, "compile", record)
    return seen


def test_torch_compile_sets_the_folder_before_compiling(compiles, cache_base):
    assert torch_compile(abs)(-2) == 2
    assert compiles == [str(cache_base / f"isa-{vector_isa()}")]


def test_the_fused_rounding_step_compiles_in_the_folder_of_its_instruction_set(
    compiles, cache_base
):
    done, result = FusedSteps(announce=False).run("twice", lambda: lambda x: x * 2, torch.ones(2))
    assert done and torch.equal(result, torch.full((2,), 2.0))
    assert compiles == [str(cache_base / f"isa-{vector_isa()}")]


def test_a_run_with_compile_true_compiles_in_the_folder_of_its_instruction_set(
    compiles, cache_base, tmp_path
):
    config = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=1, compile=True,
                       train_subset=64, batch_size=32, device="cpu")  # fmt: skip
    Trainer(config, tmp_path / "run", log=lambda *a, **k: None, progress=False)
    assert compiles == [str(cache_base / f"isa-{vector_isa()}")]


def test_qtrain_compiles_through_torch_compile_only():
    """Nothing else in qtrain calls torch.compile directly (each would bypass the folder)."""
    from pathlib import Path

    root = Path(inductor.__file__).resolve().parents[1]
    callers = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "torch.compile(" in path.read_text() and path.name != "inductor.py"
    ]
    assert callers == []


CHILD = """
import sys, torch
from qtrain.base.inductor import torch_compile
x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
f = lambda t: torch.where(t > 0, t * 3.0 + 1.0, t - 2.0).abs()
print(int((torch_compile(f, fullgraph=True, dynamic=False)(x) != f(x)).sum()))
"""


def test_a_stand_in_process_after_a_native_one_computes_the_eager_numbers(tmp_path):
    """End to end, two processes sharing one cache: native first, then under the AVX2 stand-in.
    With one folder for both, the second built the first's 16-float loops for 8-float vectors
    and 496 of these 1000 elements came out wrong."""
    import subprocess
    import sys

    from qtrain.base.inductor import compiler_found

    if "avx2" not in isas() or len(isas()) < 2 or not compiler_found(torch.device("cpu")):
        pytest.skip("needs an x86 CPU beyond AVX2 and a C++ compiler for inductor")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env[CACHE_VARIABLE] = str(tmp_path / "cache")
    wrong = []
    for extra in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        done = subprocess.run([sys.executable, "-c", CHILD], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        wrong.append(int(done.stdout.split()[-1]))
    assert wrong == [0, 0]
    assert sorted(p.name for p in (tmp_path / "cache").glob("isa-*")) == sorted(
        ["isa-avx2", f"isa-{str(isas()[0]).replace(' ', '-')}"]
    )
