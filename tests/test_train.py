"""The trainer: run folder contents, exact resume after a crash or a signal, divergence."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.divergence import DivergenceError
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.schedules import lr_factor
from qtrain.train.trainer import Trainer, TrainingInterrupted

TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in


def tiny_config(**changes) -> RunConfig:
    base = dict(
        model="tiny_mlp",
        dataset="synthetic",
        method="sr-adam",
        epochs=3,
        batch_size=64,
        lr=0.05,
        device="cpu",
        channels_last=False,
        augment=True,
        eval_batch_size=128,
    )
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def final_state(run_dir):
    return load_checkpoint(run_dir / rundir.CHECKPOINT)["model_state"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_folder_holds_config_metrics_checkpoint_and_provenance(tmp_path):
    metrics = Trainer(tiny_config(method="bc-adam"), tmp_path, log=quiet).run()
    assert len(metrics) == 3
    for name in ("config.toml", "meta.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (tmp_path / name).exists(), name
    records = rundir.read_metrics(tmp_path)
    assert comparable(records) == comparable(metrics)
    required = {
        "epoch",
        "train_loss",
        "train_error",
        "test_error",
        "lr",
        "seconds",
        "eval_seconds",
        "flip_rate",
        "wb_wr_gap",
    }
    assert required <= records[0].keys()
    assert all(0 <= r["wb_wr_gap"] <= 1 for r in records)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["qtrain_version"] and meta["torch_version"]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.05, 0.005])  # decay at ⌈3/2⌉


@pytest.mark.parametrize("method", ["bc-adam", "sr-adam"])
def test_resume_after_a_crash_mid_epoch_is_bit_identical(tmp_path, method, monkeypatch):
    config = tiny_config(method=method, checkpoint_every_steps=3)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()

    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 14:  # 8 batches an epoch: epoch 2's sixth step, after batch 3's save
            raise RuntimeError("simulated crash")
        return real_step()

    monkeypatch.setattr(crashing.optimizer, "step", step_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert (saved["epoch"], saved["sums"]["batch"]) == (1, 3)

    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert comparable(resumed) == comparable(reference)
    assert_same_weights(final_state(tmp_path / "crash"), final_state(tmp_path / "ref"))


def test_sigterm_saves_a_checkpoint_and_resume_finishes_identically(tmp_path, monkeypatch):
    config = tiny_config(method="sr-adam")
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    trainer = Trainer(config, tmp_path / "stop", log=quiet)
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_and_signal():
        calls["n"] += 1
        if calls["n"] == 5:
            trainer._stop_signal = signal.SIGTERM  # what the installed handler does
        return real_step()

    monkeypatch.setattr(trainer.optimizer, "step", step_and_signal)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    resumed = Trainer(config, tmp_path / "stop", log=quiet).run(resume=True)
    assert comparable(resumed) == comparable(reference)
    assert_same_weights(final_state(tmp_path / "stop"), final_state(tmp_path / "ref"))


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    a = Trainer(tiny_config(), tmp_path / "a", log=quiet).run()
    b = Trainer(tiny_config(), tmp_path / "b", log=quiet).run()
    c = Trainer(tiny_config(seed=1), tmp_path / "c", log=quiet).run()
    assert comparable(a) == comparable(b)
    assert comparable(a) != comparable(c)


def test_a_diverging_run_stops_with_a_clear_message_and_keeps_its_checkpoint(tmp_path, monkeypatch):
    constant = dict(method="fp-adam", schedule="constant")  # so that epochs may grow on resume
    Trainer(tiny_config(epochs=1, **constant), tmp_path, log=quiet).run()
    good = final_state(tmp_path)
    trainer = Trainer(tiny_config(epochs=2, **constant), tmp_path, log=quiet)
    forward = trainer.forward_model.forward
    monkeypatch.setattr(trainer.forward_model, "forward", lambda x: forward(x) * math.nan)
    with pytest.raises(DivergenceError, match="lower the learning rate"):
        trainer.run(resume=True)
    assert_same_weights(final_state(tmp_path), good)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    Trainer(tiny_config(epochs=1), tmp_path, log=quiet).run()
    with pytest.raises(ValueError, match="resume=True"):
        Trainer(tiny_config(epochs=1), tmp_path, log=quiet).run()


def test_resuming_with_another_method_is_refused(tmp_path):
    Trainer(tiny_config(epochs=1), tmp_path, log=quiet).run()
    with pytest.raises(ValueError, match="method"):
        Trainer(tiny_config(epochs=1, method="bc-adam"), tmp_path, log=quiet).run(resume=True)


def test_step_schedule_decays_at_half_and_three_quarters():
    factors = [lr_factor("step", e, 8) for e in range(8)]
    assert factors == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor("cosine", 0, 10) == 1 and math.isclose(lr_factor("cosine", 5, 10), 0.5)
