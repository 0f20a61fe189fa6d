"""benchmarks/soak.py keeps working: its comparison finds differences, and a two-round soak of
real `qtrain` processes under signals ends identical, with no process left behind."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
SOAK_LIMIT_S = 240


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_comparison_ignores_timing_only(soak):
    record = {"epoch": 1, "test_error": 12.5, "seconds": 3.0, "images_per_second": 9.0,
              "peak_memory_bytes": 10, "curve": [[0.1, 50.0]], "minutes_to_85": 0.2,
              "state": {0: {"step": 4}}}  # fmt: skip
    other = {**record, "seconds": 4.0, "images_per_second": 7.0, "peak_memory_bytes": 12,
             "curve": [[0.3, 50.0]], "minutes_to_85": 0.5}  # fmt: skip
    assert soak.differences(soak.untimed(record), soak.untimed(other)) == []
    assert soak.differences(soak.untimed(record), soak.untimed({**other, "test_error": 12.0}))
    assert soak.differences({"w": torch.zeros(3)}, {"w": torch.zeros(3)}) == []
    assert soak.differences({"w": torch.zeros(3)}, {"w": torch.ones(3)}) == ["tensor /w differs"]
    # bit for bit: -0.0 equals 0.0 as a number, not as bits
    assert soak.differences({"w": torch.zeros(3)}, {"w": -torch.zeros(3)})
    assert soak.differences({"w": torch.zeros(3)}, {"w": torch.zeros(3, dtype=torch.float64)})


def test_compare_bytes_and_stray_temporaries(soak, tmp_path):
    for name, data in (("a", b"packed"), ("b", b"packed"), ("c", b"packet")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(data)
    compare = soak.compare_bytes("model.safetensors")
    assert compare(tmp_path / "a", tmp_path / "b") == []
    assert compare(tmp_path / "c", tmp_path / "b") == ["model.safetensors: bytes differ"]
    (tmp_path / "a" / ".model.safetensors.x1.tmp").write_bytes(b"")
    assert soak.temporaries(tmp_path / "a") == [".model.safetensors.x1.tmp"]


def processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(command)
    return found


@pytest.mark.slow
def test_two_rounds_under_signals_end_identical(tmp_path):
    # The export job needs the reference train run, so both commands run; every round's first
    # attempt is signalled within a second (before start-up ends) and no resume is: six
    # `qtrain` starts in all.
    out = tmp_path / "soak"
    result = subprocess.run(
        [sys.executable, str(SOAK), "--rounds", "2", "--seed", "1", "--jobs", "export",
         "--kill-prob", "1", "--resume-kill-prob", "0", "--max-delay", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=SOAK_LIMIT_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rounds," in result.stdout and "0 mismatches" in result.stdout
    summary = json.loads((out / "soak.json").read_text())
    tally = summary["jobs"]["export"]
    assert tally["rounds"] == 2 and sum(tally["codes"].values()) == 2
    assert tally["mismatches"] == tally["unexpected"] == tally["leftovers"] == 0
    assert summary["failures"] == []
    assert processes_naming(str(out)) == []
