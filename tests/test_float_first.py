"""Training in float first (`float_fraction`, qtrain.train.float_first): the float phase's
steps, the switch at step F = round(f·S) with the optimizer's state restarted there, F after a
fit, and a run resumed exactly at F; the ramp onto the grid after it (`quant_ramp`): the
blended weights, their λ, a run resumed and one cut on the ramp."""

from __future__ import annotations

import json

import pytest
import torch
from test_fit_budget import (  # noqa: F401  (slow_clock is a fixture)
    STEPS_PER_EPOCH,
    comparable,
    crash_at_step,
    quiet,
    slow_clock,
    speed_config,
)
from test_methods import small_net, train_steps

from qtrain.base.errors import UserError
from qtrain.cli import main
from qtrain.export.packed import load_packed, save_packed
from qtrain.methods import create
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import inapplicable
from qtrain.train.float_first import float_steps, grid_weight, phases, ramp_steps
from qtrain.train.trainer import Trainer


def quantized(model) -> list[torch.Tensor]:
    return [model[0].weight, model[3].weight]


def on_binary_grid(w: torch.Tensor) -> bool:
    return bool(((w == 1) | (w == -1)).all())


def test_the_switch_is_a_fraction_of_the_planned_length_or_of_a_shorter_first_fit():
    assert float_steps(0.3, 100) == 30
    assert float_steps(0.0, 100) == 0
    assert float_steps(0.3, 100, first_fit_steps=50) == 15
    # a fit never moves F later than planned, so no quantized step can turn float again
    assert float_steps(0.3, 100, first_fit_steps=200) == 30


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan"), "half"])
def test_a_fraction_outside_zero_to_one_is_refused_in_one_sentence(value):
    with pytest.raises(UserError, match=r"float_fraction must be"):
        speed_config(float_fraction=value).validate()


def test_bc_trains_float_weights_then_rounds_them_with_its_moments_restarted():
    model = small_net()
    opt = create("bc-adam", model, lr=0.05, seed=1)
    start = [w.detach().clone() for w in quantized(model)]
    opt.float_phase = True
    train_steps(model, opt, 3)
    for w, w_r, w0 in zip(quantized(model), opt.latent_weights(), start, strict=True):
        assert torch.equal(w, w_r)  # the model holds w_r, clipped to ±1, unrounded
        assert not on_binary_grid(w) and bool((w.abs() <= 1).all())
        assert not torch.equal(w, w0)  # and it trains
    assert opt.flips.steps == 0  # nothing moves between grid levels in float
    assert all(len(opt.base.state[p]) > 0 for p in quantized(model))
    head = model[8].weight
    head_moments = opt.base.state[head]["exp_avg"].clone()

    opt.end_float_phase()
    assert all(len(opt.base.state[p]) == 0 for p in quantized(model))
    assert torch.equal(opt.base.state[head]["exp_avg"], head_moments)  # float layers keep theirs
    train_steps(model, opt, 1, first_batch=3)
    assert all(on_binary_grid(w) for w in quantized(model))
    assert int(opt.base.state[quantized(model)[0]]["step"]) == 1  # Adam's count restarted
    assert opt.flips.steps == 0  # from float weights to the grid: no flips to count
    train_steps(model, opt, 1, first_batch=4)
    assert opt.flips.steps == 1


def test_sr_steps_its_weights_unrounded_in_the_float_phase_then_rounds_them():
    model = small_net()
    opt = create("sr-adam", model, lr=0.05, seed=1)
    assert all(on_binary_grid(w) for w in quantized(model))  # SR starts on the grid
    opt.float_phase = True
    train_steps(model, opt, 2)
    assert not any(on_binary_grid(w) for w in quantized(model))
    opt.end_float_phase()
    train_steps(model, opt, 1, first_batch=2)
    assert all(on_binary_grid(w) for w in quantized(model))


def float_config(**changes):
    # 4 epochs of 7 steps, F = round(0.5 · 28) = 14: the switch opens the third epoch
    return speed_config(**{"epochs": 4, "time_budget_s": None, "fit_to_budget": False,
                           "float_fraction": 0.5, **changes})  # fmt: skip


def test_a_run_trains_in_float_until_step_f_and_quantized_after(tmp_path):
    lines = []
    run = Trainer(float_config(), tmp_path / "run", log=lambda *a, **k: lines.append(str(a[0])))
    records = run.run()
    assert run.float_steps == 14
    assert any(line.startswith("step 14: the float phase ends") for line in lines)
    assert [r["flip_rate"] == 0 for r in records] == [True, True, False, False]
    assert [r["wb_wr_gap"] == 0 for r in records] == [True, True, False, False]
    state = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["model_state"]
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and all(on_binary_grid(w) for w in convs[1:])  # [0]: the whitening filters


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_resumed_exactly_at_the_switch_restarts_the_moments_as_an_uninterrupted_one(
    tmp_path,
):
    config = float_config(checkpoint_every_steps=1)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    # the 15th step call crashes: the checkpoint holds 14 steps, all of them float
    crash_at_step(Trainer(config, tmp_path / "crash", log=quiet), 15)
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert (saved["epoch"], saved["sums"]["batch"]) == (2, 0)
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"]
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


def test_a_fitted_run_switches_at_the_fraction_of_its_first_fit(tmp_path, slow_clock):  # noqa: F811
    slow_clock(0.5)  # the first epoch's speed fits 38 of the recipe's 70 steps
    run = Trainer(speed_config(float_fraction=0.5, refit_to_budget=False), tmp_path / "run",
                  log=quiet)  # fmt: skip
    assert run.float_steps == 35  # as planned, before the fit
    run.run()
    assert run.total_steps == 38 and run.float_steps == 19


def test_a_refit_before_the_switch_moves_it_with_the_run_and_one_after_it_does_not():
    # planned 100 steps, first fit 80, f = 0.3, r = 0.1: F = 24, R = 8
    assert phases(0.3, 0.1, 100, 80) == (24, 8)
    assert phases(0.3, 0.1, 100, 80, [(14, 50)]) == (15, 5)  # in float: F and R follow
    assert phases(0.3, 0.1, 100, 80, [(14, 40)]) == (14, 4)  # round(12) is past: F at once
    assert phases(0.3, 0.1, 100, 80, [(14, 120)]) == (30, 10)  # longer, within the plan
    assert phases(0.3, 0.1, 100, 80, [(28, 30)]) == (24, 5)  # on the ramp: it ends at step 29
    assert phases(0.3, 0.1, 100, 80, [(28, 90)]) == (24, 8)  # ... and never lengthens
    assert phases(0.3, 0.1, 100, 80, [(40, 45)]) == (24, 8)  # on the grid: nothing moves
    assert phases(0.3, 0.1, 100, 80, [(14, 14)]) == (24, 8)  # no step left: the run is cut
    assert phases(0.3, 0.0, 100, 80, [(10, 60), (17, 40)]) == (17, 0)  # in order: 18, then 17


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_that_slows_in_its_float_phase_keeps_its_share_of_quantized_steps(
    tmp_path,
    slow_clock,  # noqa: F811
):
    """From step 8 a step takes 0.75 s instead of 0.5: the refit after epoch 2 (8.75 s spent)
    cuts the first fit's 38 steps to 14 + ⌊10.25 / 0.75⌋ = 27. With F = round(0.7 · 38) = 27
    kept from the first fit, the whole run would train in float and end with its weights
    rounded untrained; F follows the refit to round(0.7 · 27) = 19. A run crashed with
    exactly 19 steps done resumes at the new switch as the uninterrupted one."""
    config = speed_config(float_fraction=0.7, checkpoint_every_steps=1)
    clock = slow_clock(0.5)
    clock.drift_from, clock.drift_step = 8, 0.75
    lines = []
    run = Trainer(config, tmp_path / "ref", log=lambda *a, **k: lines.append(str(a[0])))
    reference = run.run()
    fit = json.loads((tmp_path / "ref" / rundir.SUMMARY).read_text())["fit"]
    assert (fit["steps"], [(r["step"], r["steps"]) for r in fit["refits"]]) == (38, [(14, 27)])
    assert (run.total_steps, run.float_steps) == (27, 19)
    assert any(line.startswith("step 19: the float phase ends") for line in lines)
    assert not any("stops in its float phase" in line for line in lines)
    assert reference[-1]["step"] == 27 and reference[-1]["lr"] == 0.0
    assert sum(r["seconds"] for r in reference) == 3.5 + 20 * 0.75 == 18.5
    assert all(on_binary_grid(p.detach()) for p in run.optimizer.quantized)

    clock.steps = 0
    crash_at_step(Trainer(config, tmp_path / "crash", log=quiet), 20)
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert saved["epoch"] * STEPS_PER_EPOCH + saved["sums"]["batch"] == 19
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"]
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


def test_the_switch_leaves_at_least_one_quantized_step():
    assert float_steps(0.9, 4) == 3  # round(3.6) = 4 would leave none
    assert float_steps(0.5, 1) == 0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("method", ["bc-adam", "sr-adam"])
def test_a_run_cut_by_its_budget_in_the_float_phase_reports_weights_on_the_grid(
    tmp_path,
    slow_clock,  # noqa: F811
    method,
):
    slow_clock(0.5)  # 20 s of budget: 40 of the 70 steps, all inside F = 63
    lines = []
    config = speed_config(method=method, fit_to_budget=False, float_fraction=0.9)
    run = Trainer(config, tmp_path / "run", log=lambda *a, **k: lines.append(str(a[0])))
    records = run.run()
    assert records[-1]["step"] < run.float_steps == 63
    assert any("stops in its float phase" in line for line in lines)
    state = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)["model_state"]
    convs = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4]
    assert all(on_binary_grid(w) for w in convs[1:])  # [0]: the whitening filters
    model = run.model
    assert all(on_binary_grid(p.detach()) for p in run.optimizer.quantized)
    assert model is not None


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_saved_inside_its_float_phase_is_exported_after_it_finishes(tmp_path, capsys):
    config = float_config(checkpoint_every_steps=1)
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 10)  # 9 float steps saved
    record = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    with pytest.raises(UserError, match=r"saved inside its float phase \(float_fraction=0.5\)"):
        save_packed(tmp_path / "m.safetensors", record)
    assert not (tmp_path / "m.safetensors").exists()
    onnx = ["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]
    assert main(onnx) == 2
    assert "inside its float phase" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
    Trainer(config, tmp_path / "run", log=quiet).run(resume=True)  # through F to the end
    finished = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    save_packed(tmp_path / "m.safetensors", finished)
    unpacked = load_packed(tmp_path / "m.safetensors").state_dict()
    assert finished["quantized"]
    assert all(torch.equal(unpacked[n], finished["model_state"][n]) for n in finished["quantized"])


# -- the ramp onto the grid (quant_ramp) -------------------------------------------------------
def test_the_ramp_takes_r_of_the_run_after_f_and_leaves_the_last_step_on_the_grid():
    assert ramp_steps(0.1, 30, 100) == 10
    assert ramp_steps(0.1, 30, 100, first_fit_steps=50) == 5  # the same S as F's
    assert ramp_steps(0.5, 60, 100) == 39  # F + R = 99: step 99, the last, is on the grid
    assert ramp_steps(0.0, 30, 100) == 0
    # λ_s = (s − F + 1)/(R + 1): R + 1 equal parts from the float weights (0) to the grid (1)
    assert [grid_weight(s, 2, 3) for s in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert [grid_weight(s, 0, 0) for s in range(2)] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"quant_ramp": 1.0}, r"quant_ramp must be in \[0, 1\)"),
        ({"quant_ramp": "x"}, r"quant_ramp must be a number"),
        ({"float_fraction": 0.6, "quant_ramp": 0.4}, r"add up to the whole run.*less than 1"),
    ],
)
def test_an_impossible_ramp_is_refused_in_one_sentence(changes, message):
    with pytest.raises(UserError, match=message):
        speed_config(**changes).validate()


def test_a_ramp_is_refused_for_methods_without_latent_weights():
    assert inapplicable(speed_config(quant_ramp=0.1)) is None
    sentence = inapplicable(speed_config(method="sr-adam", quant_ramp=0.1))
    assert sentence.startswith("quant_ramp applies to BinaryConnect (bc-*) methods")


def test_a_bc_step_on_the_ramp_writes_the_blend_of_w_r_and_its_rounding_and_counts_no_flips():
    model = small_net()
    opt = create("bc-adam", model, lr=0.05, seed=1)
    opt.hold_float_weights()
    assert all(torch.equal(w, w_r) for w, w_r in zip(quantized(model), opt.latent_weights(),
                                                     strict=True))  # fmt: skip
    opt.grid_weight = 0.25
    train_steps(model, opt, 2)
    for w, w_r in zip(quantized(model), opt.latent_weights(), strict=True):
        assert torch.equal(w, torch.lerp(w_r, torch.sign(w_r), 0.25))
        assert not on_binary_grid(w)
    assert opt.flips.steps == 0
    opt.grid_weight, opt.starts_on_grid = 1.0, False  # the first step back on the grid
    train_steps(model, opt, 1, first_batch=2)
    assert all(on_binary_grid(w) for w in quantized(model)) and opt.flips.steps == 0
    opt.starts_on_grid = True
    train_steps(model, opt, 1, first_batch=3)
    assert opt.flips.steps == 1


def ramp_config(**changes):
    # 4 epochs of 7 steps: F = round(0.25 · 28) = 7, R = 7, on the grid from step 14
    return float_config(float_fraction=0.25, quant_ramp=0.25, **changes)


def test_a_run_ramps_its_weights_onto_the_grid_and_ends_there(tmp_path):
    lines = []
    run = Trainer(ramp_config(), tmp_path / "run", log=lambda *a, **k: lines.append(str(a[0])))
    records = run.run()
    assert (run.float_steps, run.ramp_steps) == (7, 7)
    assert any(line.startswith("step 7: the float phase ends") and "over 7 steps" in line
               for line in lines)  # fmt: skip
    # flips only from step 15 on: the epochs of the float phase and of the ramp have none
    assert [r["flip_rate"] == 0 for r in records] == [True, True, False, False]
    assert records[0]["wb_wr_gap"] == 0 and records[1]["wb_wr_gap"] > 0
    assert all(on_binary_grid(p.detach()) for p in run.optimizer.quantized)


def test_a_ramp_from_the_first_step_starts_from_the_float_weights(tmp_path):
    seen, lines = [], []
    run = Trainer(float_config(float_fraction=0.0, quant_ramp=0.25), tmp_path / "run",
                  log=lambda *a, **k: lines.append(str(a[0])))  # fmt: skip
    first = run.optimizer.quantized[0]

    def record(module, _inputs):
        if module.training:  # step k's forward pass: the weights step k − 1 wrote
            seen.append(first.detach().clone())

    run.model.register_forward_pre_hook(record)
    run.run()
    assert run.ramp_steps == 7
    assert (
        "step 0: the weights start in float, moving onto the grid over 7 steps (quant_ramp "
        "0.25)" in lines
    )
    # the first forward pass sees clip(w_r) (what init_from loads), the next λ = 1/8 … 7/8 of
    # the way to the grid, and the ninth the grid
    latent_start = seen[0]
    assert not on_binary_grid(latent_start) and bool((latent_start.abs() < 1).any())
    assert not any(on_binary_grid(w) for w in seen[1:8]) and on_binary_grid(seen[8])


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_resumed_on_the_ramp_is_the_uninterrupted_one_to_the_bit(tmp_path):
    config = ramp_config(checkpoint_every_steps=1)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crash_at_step(Trainer(config, tmp_path / "crash", log=quiet), 11)  # 10 steps saved, λ = 4/8
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"]
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_cut_on_the_ramp_reports_weights_on_the_grid_and_is_not_exported_before(
    tmp_path,
    slow_clock,  # noqa: F811
):
    slow_clock(0.5)  # 20 s of budget: 40 of the 70 steps; F = 7, on the grid from step 63
    lines = []
    config = speed_config(fit_to_budget=False, float_fraction=0.1, quant_ramp=0.8,
                          checkpoint_every_steps=1)  # fmt: skip
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 20)
    record = load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT)
    with pytest.raises(UserError, match=r"inside its float phase \(float_fraction=0.1\) or its "
                       r"ramp onto the grid \(quant_ramp=0.8\)"):  # fmt: skip
        save_packed(tmp_path / "m.safetensors", record)
    run = Trainer(config, tmp_path / "run", log=lambda *a, **k: lines.append(str(a[0])))
    records = run.run(resume=True)
    assert records[-1]["step"] < run.float_steps + run.ramp_steps == 63
    assert any("stops in its ramp onto the grid" in line for line in lines)
    assert all(on_binary_grid(p.detach()) for p in run.optimizer.quantized)
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT))
