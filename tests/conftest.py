"""Shared fixtures: seeded randomness and the location of the real CIFAR-10 files."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# the `fake_training` fixture of the experiment tests
pytest_plugins = ("fake_training",)

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
# The real CIFAR-10 (official python format) sits beside the checkout when it is available.
CIFAR10_DIR = Path(os.environ.get("QTRAIN_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """The suite's tensors are tiny: a second intra-op thread only adds hand-off latency."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cifar10_root() -> Path:
    """Folder holding `cifar-10-batches-py`; skips the test when it is absent."""
    if not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").exists():
        pytest.skip(f"real CIFAR-10 not found under {CIFAR10_DIR}")
    return CIFAR10_DIR


@pytest.fixture(scope="module")
def benchmark_module():
    """load(name): benchmarks/NAME.py imported as a module, with benchmarks/ on sys.path until
    the test module ends (the benchmarks import their shared parts, speed_common, by name)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield load
    finally:
        sys.path.remove(str(BENCHMARKS))
