"""The GPU code paths: device choice, bf16 autocast, torch.compile, gpu_check.

Without a GPU these run the same code on the CPU (explicit amp="bf16", compile=True on a tiny
model, the gpu_check script in --smoke mode); with CUDA the marked tests also run there.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import time
import warnings
from pathlib import Path

import pytest
import torch

from qtrain import methods
from qtrain.quant import binary
from qtrain.train.config import RunConfig
from qtrain.train.devices import autocast_context, resolve_device
from qtrain.train.trainer import Trainer

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def tiny_config(**changes) -> RunConfig:
    base = dict(
        model="tiny_cnn",
        dataset="synthetic",
        method="bc-adam",
        epochs=1,
        batch_size=64,
        device="cpu",
        eval_batch_size=128,
        threads=1,
    )
    return RunConfig(**{**base, **changes})


def train_tiny(tmp_path, **changes) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(tiny_config(**changes), tmp_path / "run", log=lambda *a: None)
    return trainer, trainer.run()


def assert_quantized_weights_on_grid(trainer: Trainer) -> None:
    params = dict(trainer.model.named_parameters())
    assert trainer.quantized_names
    for name in trainer.quantized_names:
        assert params[name].dtype == torch.float32  # bf16 is for activations only
        assert trainer.optimizer.grid.contains(params[name].detach())


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_device_is_cuda_exactly_when_cuda_is_available():
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_autocast_is_bf16_on_cuda_by_default_and_on_cpu_only_when_asked():
    with warnings.catch_warnings():  # without CUDA, torch warns that it disables the context
        warnings.simplefilter("ignore", UserWarning)
        on_cuda = autocast_context(torch.device("cuda"), "auto")
    assert isinstance(on_cuda, torch.autocast)
    assert on_cuda.device == "cuda" and on_cuda.fast_dtype == torch.bfloat16
    on_cpu = autocast_context(torch.device("cpu"), "bf16")
    assert on_cpu.device == "cpu" and on_cpu.fast_dtype == torch.bfloat16
    for device, amp in (("cpu", "auto"), ("cpu", "off"), ("cuda", "off")):
        assert isinstance(autocast_context(torch.device(device), amp), contextlib.nullcontext)


def test_bf16_autocast_epoch_on_cpu_trains_float32_weights_on_the_grid(tmp_path):
    trainer, metrics = train_tiny(tmp_path, amp="bf16")
    assert math.isfinite(metrics[0]["train_loss"]) and math.isfinite(metrics[0]["test_loss"])
    assert_quantized_weights_on_grid(trainer)
    x, _ = next(iter(trainer.train_loader.epoch(0)))
    with autocast_context(trainer.device, "bf16"):
        assert trainer.forward_model(x).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def compile_works() -> None:
    """Skips when torch.compile cannot build a kernel here (no C++ compiler, platform)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as error:  # inductor reports a missing toolchain in several ways
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")


@pytest.mark.slow
def test_compiled_model_trains_an_epoch_on_cpu(tmp_path, compile_works):
    """compile=True through the trainer (inductor, C++ on CPU); prints the compile time."""
    start = time.perf_counter()
    trainer, metrics = train_tiny(tmp_path, compile=True, amp="bf16")
    print(f"compile + one tiny epoch: {time.perf_counter() - start:.1f} s")
    assert trainer.forward_model is not trainer.model  # the compiled wrapper ran the epoch
    assert math.isfinite(metrics[0]["train_loss"])
    assert_quantized_weights_on_grid(trainer)


def test_gpu_check_script_runs_end_to_end_in_smoke_mode(capsys):
    gpu_check_module().main(["--device", "cpu", "--smoke", "--no-compile", "--epochs", "2"])
    printed = capsys.readouterr().out
    for expected in ("bf16 matmul peak", "images/s", "% of the measured bf16 peak", "160-epoch"):
        assert expected in printed


@pytest.mark.skipif(CUDA, reason="checks the message shown without a CUDA GPU")
def test_gpu_check_script_refuses_to_run_without_cuda():
    with pytest.raises(SystemExit, match="torch sees no CUDA GPU"):
        gpu_check_module().main([])


@needs_cuda
def test_cuda_epoch_with_bf16_channels_last_and_compile(tmp_path):
    trainer, metrics = train_tiny(tmp_path, device="cuda", amp="auto", compile=True)
    assert trainer.device.type == "cuda"
    assert math.isfinite(metrics[0]["train_loss"])
    assert_quantized_weights_on_grid(trainer)


@needs_cuda
def test_sr_adam_on_cuda_resumes_bit_identically():
    """The CUDA rounding generator is checkpointed: a restored step repeats exactly."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.Flatten()).cuda()
    opt = methods.create("sr-adam", model, lr=0.1)
    x = torch.randn(8, 3, 5, 5, device="cuda")

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    step()
    expected = model[0].weight.detach().clone()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    step()
    assert torch.equal(model[0].weight, expected) and binary().contains(expected)


@needs_cuda
@pytest.mark.parametrize("method", ["bc-adam", "sr-adam"])
def test_a_model_moved_to_cuda_after_building_the_optimizer_is_followed(method):
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    opt = methods.create(method, model, lr=0.05)
    model.to("cuda")
    for _ in range(3):
        x = torch.randn(8, 3, 6, 6, device="cuda")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.arange(8, device="cuda") % 2).backward()
        opt.step()
    weight = model[0].weight
    assert weight.is_cuda and opt.grid.contains(weight.detach())
    assert opt.generator.device.type == "cuda" and opt._flat_wb.is_cuda
    assert all(w.is_cuda for w in opt.latent_weights())
    with pytest.raises(ValueError, match="resume with the model on a cuda device"):
        methods.create(method, copy.deepcopy(model).cpu(), lr=0.05).load_state_dict(
            opt.state_dict()
        )


@needs_cuda
def test_a_cuda_state_loads_into_an_optimizer_whose_model_moved_to_cuda_after_building():
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)).cuda()
    saved = methods.create("sr-adam", model, lr=0.05).state_dict()
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    opt = methods.create("sr-adam", fresh, lr=0.05)
    fresh.cuda()
    opt.load_state_dict(saved)
    assert opt.generator.device.type == "cuda"
    assert torch.equal(opt.generator.get_state(), saved["quantization"]["generator"])
