"""No checkpoint is written from a diverged state, whatever the device's check cadence."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.divergence import DivergenceError
from qtrain.train.trainer import Trainer

# 512 synthetic images in batches of 64: 8 steps per epoch, a checkpoint every 2 steps.
CONFIG = RunConfig(
    model="tiny_mlp",
    dataset="synthetic",
    method="fp-adam",
    epochs=1,
    batch_size=64,
    eval_batch_size=128,
    device="cpu",
    channels_last=False,
    checkpoint_every_steps=2,
)


def quiet(*_args, **_kwargs):
    pass


def saved_batch(run_dir) -> int:
    return load_checkpoint(run_dir / rundir.CHECKPOINT)["training"]["sums"]["batch"]


def all_finite(run_dir) -> bool:
    state = load_checkpoint(run_dir / rundir.CHECKPOINT)["model_state"]
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def nan_loss_from_step(trainer: Trainer, first: int, monkeypatch) -> None:
    forward, calls = trainer.forward_model.forward, {"n": 0}

    def forward_then_nan(x):
        calls["n"] += 1
        out = forward(x)
        return out * math.nan if trainer.model.training and calls["n"] >= first else out

    monkeypatch.setattr(trainer.forward_model, "forward", forward_then_nan)


def test_with_the_cuda_cadence_a_nan_loss_is_caught_before_the_next_checkpoint(
    tmp_path, monkeypatch
):
    # Checking every 25 steps (as on CUDA) would let the save at step 4 write a NaN state.
    monkeypatch.setattr(Trainer, "_check_every", lambda self: 25)
    trainer = Trainer(CONFIG, tmp_path, log=quiet)
    nan_loss_from_step(trainer, 3, monkeypatch)
    with pytest.raises(DivergenceError, match="the loss became nan at epoch 1, batch 3;"):
        trainer.run()
    assert saved_batch(tmp_path) == 2 and all_finite(tmp_path)


@pytest.mark.parametrize("trigger", ["periodic", "signal"])
def test_weights_that_overflow_in_a_step_are_never_saved(tmp_path, monkeypatch, trigger):
    # Step 4 leaves an infinite weight while its loss (computed before the step) was finite.
    config = CONFIG.replace(checkpoint_every_steps=2 if trigger == "periodic" else 0)
    trainer = Trainer(config, tmp_path, log=quiet)
    step, calls = trainer.optimizer.step, {"n": 0}

    def step_then_overflow():
        calls["n"] += 1
        step()
        if calls["n"] == 4:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = math.inf
            if trigger == "signal":
                trainer._stop_signal = signal.SIGTERM

    monkeypatch.setattr(trainer.optimizer, "step", step_then_overflow)
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        trainer.run()
    if trigger == "periodic":
        assert saved_batch(tmp_path) == 2 and all_finite(tmp_path)
    else:
        assert not (tmp_path / rundir.CHECKPOINT).exists()


def test_an_end_of_epoch_checkpoint_waits_for_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_check_every", lambda self: 25)
    trainer = Trainer(CONFIG.replace(checkpoint_every_steps=0), tmp_path, log=quiet)
    nan_loss_from_step(trainer, 8, monkeypatch)  # the epoch's last step
    with pytest.raises(DivergenceError, match="batch 8;"):
        trainer.run()
    assert not (tmp_path / rundir.CHECKPOINT).exists()
