"""amp = "auto" resolves once, at a run's creation, to the precision this machine computes
fast (bf16 on CUDA and on CPUs with native bf16, float32 elsewhere); the run records the
resolved value, compares it on resume and exports it, and keeps it on another machine."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.base import cpu_isa
from qtrain.cli import main
from qtrain.experiments.runner import Cell, run_cells
from qtrain.train import devices, rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import ConfigError, RunConfig, load_toml
from qtrain.train.trainer import train

TINY = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=1, batch_size=64, device="cpu",
                 schedule="constant")  # fmt: skip


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native(request, monkeypatch):
    """This CPU with native bf16 (AVX-512 BF16 / AMX) or without (AVX2, or AVX-512 without
    BF16), by `qtrain.base.cpu_isa`'s check (tests/test_cpu_isa.py checks that one)."""
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: request.param)
    return request.param


def test_auto_resolves_by_the_devices_capability(native, monkeypatch):
    cpu = devices.resolve_amp(TINY, torch.device("cpu"))
    assert cpu.amp == ("bf16" if native else "off")
    for cuda_bf16 in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda v=cuda_bf16: v)
        cuda = devices.resolve_amp(TINY, torch.device("cuda"))
        assert cuda.amp == ("bf16" if cuda_bf16 else "off")
    for explicit in ("off", "bf16"):  # an explicit value is what it says, everywhere
        assert devices.resolve_amp(TINY.replace(amp=explicit), torch.device("cpu")).amp == explicit


def test_auto_is_float32_on_avx512_without_bf16_where_onednn_would_emulate_bf16(monkeypatch):
    """oneDNN accepts bf16 on any AVX-512 CPU (its check says yes) but emulates it without
    AVX-512 BF16, 2.56x slower than float32 in the speedrun's step: auto must not take it."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert devices.resolve_amp(TINY, torch.device("cpu")).amp == "off"
    assert "no native bf16" in devices.slow_bf16_note(torch.device("cpu"), "bf16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert devices.resolve_amp(TINY, torch.device("cpu")).amp == "bf16"
    assert devices.slow_bf16_note(torch.device("cpu"), "bf16") is None


def test_a_run_records_compares_and_exports_the_resolved_precision(native, tmp_path):
    resolved = "bf16" if native else "off"
    train(TINY, tmp_path / "run", log=quiet)
    assert load_toml(tmp_path / "run" / rundir.CONFIG)["amp"] == resolved
    assert load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["config"]["amp"] == resolved
    more = TINY.replace(epochs=2)  # a constant schedule may be extended on resume
    assert len(train(more, tmp_path / "run", resume=True, log=quiet)) == 2
    other = "off" if native else "bf16"
    with pytest.raises(ConfigError, match=f"amp='{resolved}', not '{other}'"):
        train(more.replace(amp=other), tmp_path / "run", resume=True, log=quiet)


def test_a_run_moved_to_another_kind_of_cpu_keeps_the_precision_it_began_with(
    native, monkeypatch, tmp_path
):
    """auto is resolved once, at creation: resumed where the other precision would be chosen
    (a run begun on a CPU with native bf16 continued on one without, or the other way), the
    run continues in its own, and a bf16 one says that it now trains slower."""
    began = "bf16" if native else "off"
    train(TINY, tmp_path / "run", log=quiet)
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: not native)  # the other machine
    lines = []
    more = TINY.replace(epochs=2)
    metrics = train(more, tmp_path / "run", resume=True, log=lambda *a, **k: lines.append(a))
    assert len(metrics) == 2
    assert load_toml(tmp_path / "run" / rundir.CONFIG)["amp"] == began
    assert load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["config"]["amp"] == began
    notes = [
        line for line in lines if "continues in bf16, the precision it trained in" in str(line[0])
    ]
    assert len(notes) == (1 if native else 0)
    other = "off" if native else "bf16"  # asked for explicitly, the other one is refused
    with pytest.raises(ConfigError, match=f"amp='{began}', not '{other}'"):
        train(more.replace(epochs=3, amp=other), tmp_path / "run", resume=True, log=quiet)


def test_an_experiment_reads_back_a_run_finished_on_another_kind_of_cpu(
    native, monkeypatch, tmp_path
):
    """Printing an experiment's table again on another machine reads its finished runs back
    instead of refusing them for the precision that machine would choose."""
    cell = Cell("run", TINY, row="tiny", method="fp")
    first = run_cells([cell], tmp_path, log=None)
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: not native)
    again = run_cells([cell], tmp_path, log=None)
    assert again[0].metrics == first[0].metrics
    other = "off" if native else "bf16"
    with pytest.raises(ConfigError, match=f"holds a run with amp='{'bf16' if native else 'off'}'"):
        run_cells([Cell("run", TINY.replace(amp=other), row="tiny", method="fp")], tmp_path)


def test_eval_of_a_bf16_run_where_bf16_is_emulated_says_so_on_stderr(monkeypatch, tmp_path, capsys):
    """`qtrain eval` evaluates at the run's precision; where that is emulated, slower, a note on
    standard error says so, and standard output holds the result only."""
    train(TINY.replace(amp="bf16"), tmp_path / "run", log=quiet)
    for native in (False, True):
        monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda v=native: v)
        assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["test_error"] is not None
        said = "this run is evaluated in bf16, the precision it trained in, but this CPU has no"
        assert (said in err) == (not native)


def test_a_run_made_before_auto_was_resolved_resumes_at_its_precision(tmp_path):
    """Such a run recorded "auto", which then meant float32 on the CPU."""
    train(TINY.replace(amp="off"), tmp_path / "run", log=quiet)
    path = tmp_path / "run" / rundir.CONFIG
    path.write_text(path.read_text().replace('amp = "off"', 'amp = "auto"'))
    saved = devices.resolve_saved_amp(load_toml(path), torch.device("cpu"))
    assert saved["amp"] == "off"
    assert devices.resolve_saved_amp({"amp": "auto"}, torch.device("cuda"))["amp"] == "bf16"


@pytest.mark.parametrize("amp, tf32", [("off", False), ("bf16", True)])
def test_tf32_on_cuda_follows_amp_and_the_cpu_is_left_alone(amp, tf32):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        devices.set_tf32(torch.device("cpu"), amp)
        assert torch.backends.cuda.matmul.allow_tf32 is (not tf32)
        devices.set_tf32(torch.device("cuda"), amp)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32
        assert torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
