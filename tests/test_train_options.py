"""The trainer with the methods and options added after the paper: scales, binary
activations, Bop, AdamW, trackers — each reaches the model and optimizer, is saved, and resumes."""

from __future__ import annotations

import pytest
import torch
from test_train import assert_same_weights, comparable, quiet

from qtrain import methods
from qtrain.export import load_any_model
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer


def options_config(**changes) -> RunConfig:
    base = dict(
        model="tiny_cnn",
        dataset="synthetic",
        width=0.25,
        method="bc-adam",
        epochs=2,
        batch_size=64,
        lr=0.05,
        device="cpu",
        channels_last=False,
        eval_batch_size=128,
        train_subset=256,
    )
    return RunConfig(**{**base, **changes})


CASES = [
    dict(method="bc-adam", scale="absmean"),
    dict(method="bc-adamw", scale="he", weight_decay=0.01),
    dict(method="bc-adam", grid="ternary", scale="absmean-tensor"),
    dict(method="bop-adam"),
    dict(method="bop2-adam"),
    dict(method="sr-adamw", scale="he"),
    dict(method="bc-adam", activations="binary"),
    dict(method="bop-adam", activations="binary", bop_tau=1e-6),
]


def case_id(case: dict) -> str:
    return "-".join(str(v) for v in case.values())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_option_reaches_the_run_and_its_saved_model(tmp_path, case):
    config = options_config(**case)
    trainer = Trainer(config, tmp_path, log=quiet)
    assert trainer.optimizer.scale == config.scale
    if config.bop_tau is not None:
        assert trainer.optimizer.param_groups[0]["tau"] == config.bop_tau
    metrics = trainer.run()
    assert len(metrics) == 2 and all(m["flip_rate"] >= 0 for m in metrics)
    record = load_checkpoint(tmp_path / rundir.CHECKPOINT)
    assert record["method"]["scale"] == config.scale
    assert record["model"]["activations"] == config.activations
    # The saved model is the trained one: same logits from the checkpoint as from the trainer.
    model, _ = load_any_model(tmp_path)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), trainer.model(x))


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[7]], ids=case_id)
def test_option_runs_resume_exactly_after_a_crash_mid_epoch(tmp_path, monkeypatch, case):
    config = options_config(**case, epochs=3, checkpoint_every_steps=2)  # 4 batches an epoch
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()

    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 8:  # epoch 2's fourth step, after its second batch was saved
            raise RuntimeError("simulated crash")
        return real_step()

    monkeypatch.setattr(crashing.optimizer, "step", step_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert comparable(resumed) == comparable(reference)
    assert_same_weights(
        load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"],
        load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"],
    )


def test_a_scale_the_method_cannot_use_is_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="absmean"):
        Trainer(options_config(method="sr-adam", scale="absmean"), tmp_path / "run", log=quiet)
    assert not (tmp_path / "run").exists()


def test_tensorboard_log_holds_the_metrics_and_bc_latent_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = Trainer(options_config(log="tensorboard"), tmp_path, log=quiet).run()
    events = EventAccumulator(str(tmp_path / "tensorboard"), {"scalars": 0, "histograms": 0})
    events.Reload()
    for key in ("train_loss", "test_error", "lr", "flip_rate", "wb_wr_gap"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in logged] == [1, 2]
        assert [v for _, v in logged] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    histograms = events.Histograms("latent_weights")
    assert [h.step for h in histograms] == [1, 2]
    quantized, _ = methods.split_parameters(Trainer(options_config(), tmp_path / "x").model)
    assert histograms[0].histogram_value.num == sum(p.numel() for p in quantized)
