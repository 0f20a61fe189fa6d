"""A run with `compile = true` (the trainer's forward model through torch.compile, inductor's
C++ backend on the CPU) against the same run eager: same seed, same batches, float32.

Inductor fuses the model's elementwise work and its batch-norm reductions into its own loops,
which sum in another order than ATen's kernels, so the two runs do not agree bit for bit: on a
2-core AVX-512 EPYC (torch 2.13.0+cpu) the training loss of 4 steps came out equal, the test
loss 1.4e-6 apart (relative), the float parameters 1 ulp apart (≤ 1.2e-7) and BC's latent
weights up to 1.8e-5 apart, because Adam divides each gradient's 1-ulp difference by √v̂,
which is tiny where gradients are. Hence TOLERANCE. Quantized weights are rounded from those
latent weights, so one near a rounding threshold may land on the other level; the test counts
those instead of asking for none (there were none).
"""

from __future__ import annotations

import math

import pytest
import torch

import qtrain.train.trainer as trainer_module
from qtrain.base.errors import UserError
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer

TOLERANCE = 1e-4  # relative for losses; relative and absolute for weights (module doc)
STEPS = 4
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def inductor() -> None:
    """Skips when inductor cannot build a kernel here (no C++ compiler, platform)."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as error:  # inductor reports a missing toolchain in several ways
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}: {error}")


def run(tmp_path, name: str, **changes) -> Trainer:
    values = dict(model="tiny_cnn", dataset="synthetic", method="bc-adam", epochs=1,
                  batch_size=32, max_steps=STEPS, device="cpu", amp="off", threads=1,
                  eval_batch_size=128, fused_quant="off")  # fmt: skip
    config = RunConfig(**{**values, **changes})
    trainer = Trainer(config, tmp_path / name, log=lambda *a: None, progress=False)
    trainer.metrics = trainer.run()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
)
def test_a_compiled_run_trains_as_the_eager_run(tmp_path, inductor, device):
    """On CUDA with fused_quant = "on" in the compiled run too (benchmarks/gpu_check.sh)."""
    eager = run(tmp_path, "eager", device=device)
    fused = "on" if device == "cuda" else "off"
    compiled = run(tmp_path, "compiled", compile=True, device=device, fused_quant=fused)
    assert compiled.forward_model is not compiled.model  # the compiled wrapper trained
    for key in ("train_loss", "test_loss"):
        a, b = eager.metrics[-1][key], compiled.metrics[-1][key]
        assert math.isfinite(a) and math.isclose(a, b, rel_tol=TOLERANCE), (key, a, b)
    latent = zip(eager.optimizer.latent_weights(), compiled.optimizer.latent_weights(),
                 strict=True)  # fmt: skip
    for a, b in latent:
        torch.testing.assert_close(b, a, rtol=TOLERANCE, atol=TOLERANCE)
    weights = dict(compiled.model.named_parameters())
    total = changed = 0
    for name, a in eager.model.named_parameters():
        if name in eager.quantized_names:
            changed += int((a != weights[name]).sum())
            total += a.numel()
        else:
            torch.testing.assert_close(weights[name], a, rtol=TOLERANCE, atol=TOLERANCE)
    assert changed <= 0.001 * total, f"{changed} of {total} quantized weights differ"


def test_compile_without_a_compiler_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Without inductor's compiler a compiled run would fail at its first step with
    inductor's traceback; it is refused at once in one sentence, its folder never made."""
    monkeypatch.setattr(trainer_module, "compiler_found", lambda device: False)
    with pytest.raises(UserError, match="compile = true needs inductor's compiler for cpu"):
        run(tmp_path, "refused", compile=True)
    assert not (tmp_path / "refused").exists()
