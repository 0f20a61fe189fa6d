"""`fit_to_budget`: the rule's arithmetic, a fitted run that ends its schedule inside its
budget on a slowed-down clock while the unfitted one is cut (to the step for a per-step
schedule, to whole epochs for an epoch schedule), a first epoch that does not depend on the
fit, the fit kept bit for bit through a resume, the epoch a run moves to another machine in
timed on that machine, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qtrain.cli import main
from qtrain.experiments.speedrun import machines_lines, run_speedrun
from qtrain.methods.optimizer import QuantizedOptimizer
from qtrain.train import budget_fit, hardware, parts, rundir, state, trainer, width_fit
from qtrain.train.budget_fit import MARGIN, Fit, fitted_steps
from qtrain.train.checkpoint import load_checkpoint, save_checkpoint
from qtrain.train.config import ConfigError, RunConfig, load_toml
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.schedules import warmup_cosine_factor, warmup_linear_factor
from qtrain.train.trainer import Trainer

# speed_config with 64 of its 512 synthetic training images held out: 448 // 64 = 7 batches
STEPS_PER_EPOCH = 7


def speed_config(**changes) -> RunConfig:
    base = dict(model="speednet", width=0.125, dataset="synthetic", method="bc-adam", epochs=10,
                batch_size=64, lr=0.01, device="cpu", channels_last=False, eval_batch_size=128,
                threads=1, val_images=64, whiten_init=True, schedule="warmup-linear",
                warmup_steps=STEPS_PER_EPOCH, time_budget_s=20.0, fit_to_budget=True)  # fmt: skip
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """A clock that stands still except at optimizer steps, each of which takes `step` s, the
    first `slow_steps` of them `slow_step` s (a warm-up), and from step `drift_from` on (1-based,
    counted over the clock's life) `drift_step` s (the machine's speed changed)."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step
        self.slow_steps, self.slow_step, self.steps = 0, 0.0, 0
        self.drift_from, self.drift_step = None, 0.0

    def perf_counter(self) -> float:
        return self.now

    def tick(self) -> None:
        self.steps += 1
        if self.drift_from is not None and self.steps >= self.drift_from:
            self.now += self.drift_step
        else:
            self.now += self.slow_step if self.steps <= self.slow_steps else self.step


@pytest.fixture
def slow_clock(monkeypatch):
    """`slow_clock(d)`: every optimizer step takes d seconds on the clock the trainer reads
    (the records' seconds, the budget, the whitening set-up); a second call changes d."""
    clock = FakeClock(0.0)
    for module in (trainer, state, parts):
        monkeypatch.setattr(module, "time", clock)
    real_step = QuantizedOptimizer.step

    def ticking(self, *args, **kwargs):
        clock.tick()
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(QuantizedOptimizer, "step", ticking)

    def install(step: float) -> FakeClock:
        clock.step = step
        return clock

    return install


def crash_at_step(run: Trainer, step: int, resume: bool = False) -> None:
    """Run `run` (resumed when `resume`) until its optimizer's `step`-th step raises (a crash
    before that step)."""
    real_step, calls = run.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        return real_step()

    run.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.run(resume=resume)


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in MEASURED_KEYS}


# -- the rule ----------------------------------------------------------------------------------
def test_the_rule_fits_the_steps_that_remain_after_the_first_epoch_with_its_margin():
    assert MARGIN == 0.05
    # n = 100: t_step = (125.5 − 0.5) / 100 = 1.25; ⌊(1200·0.95 − 125.5) / 1.25⌋ = ⌊811.6⌋
    assert fitted_steps(1200.0, 14, 100, 125.5, 0.5) == 100 + 811
    # in whole epochs (grain n): ⌊1014.5 / 125⌋ = 8 more, 9 epochs
    assert fitted_steps(1200.0, 14, 100, 125.5, 0.5, grain=100) == 900
    assert fitted_steps(1200.0, 14, 100, 40.0, 0.0) == 1400  # 2,850 would fit: at most E·n
    assert fitted_steps(1200.0, 14, 100, 1100.0, 0.0) == 103  # room for 3 of the second epoch
    assert fitted_steps(1200.0, 14, 100, 1100.0, 0.0, grain=100) == 100  # not for all of it
    assert fitted_steps(1200.0, 14, 100, 1300.0, 0.0) == 100  # the first overran: it stays
    assert fitted_steps(100.0, 50, 10, 10.0, 0.0, grain=10, margin=0.0) == 100
    assert fitted_steps(100.0, 50, 10, 10.0, 0.0, grain=10, margin=0.1) == 90
    assert fitted_steps(100.0, 50, 10, 12.0, 2.0, grain=10, margin=0.0) == 90  # 1 + ⌊88 / 10⌋
    assert fitted_steps(100.0, 50, 10, 12.0, 2.0, margin=0.0) == 98  # 10 + ⌊88 / 1⌋


def test_a_step_is_timed_in_the_second_half_of_the_first_epoch():
    """t_step = (t₁ − t_mid) / (n − ⌊n/2⌋): the first steps' warm-up is not charged to the
    later ones; without t_mid (an older fit, an epoch of one step) the epoch's mean."""
    # n = 100, t_mid = 70.5 at step 50: t_step = 55 / 50 = 1.1; ⌊1014.5 / 1.1⌋ = 922
    assert budget_fit.step_seconds(100, 125.5, 0.5, 70.5) == pytest.approx(1.1)
    assert fitted_steps(1200.0, 14, 100, 125.5, 0.5, mid_epoch_seconds=70.5) == 100 + 922
    assert budget_fit.step_seconds(100, 125.5, 0.5) == pytest.approx(1.25)  # the mean
    assert budget_fit.mid_step(7) == 3 and budget_fit.mid_step(1) is None
    assert budget_fit.step_seconds(1, 3.0, 1.0, 2.5) == 2.0  # no second half: the mean


def test_after_a_move_the_second_half_of_the_new_machines_steps_is_timed():
    """Resumed on another machine at batch b of n steps: t_mid at m' = b + ⌊(n − b)/2⌋, and
    t_step = (t_e − t_mid) / (n − m'); no window with under 2 steps left. A fit records m'
    (`timed_from`), and one recorded before it did reads as timed from the middle step."""
    assert [budget_fit.mid_step(7, b) for b in range(7)] == [3, 4, 4, 5, 5, 6, None]
    # 7 steps in 9 s, the last two 1.5 s each: t_mid = 6 s at the end of step 5
    assert budget_fit.step_seconds(7, 9.0, 0.0, 6.0, timed_from=5) == 1.5
    assert budget_fit.step_seconds(7, 9.0, 0.0, 6.0) == 0.75  # from step 3: (9 − 6) / 4
    config, cpu = speed_config(), torch.device("cpu")
    moved = budget_fit.fit(config, 7, 9.0, 0.0, cpu, mid_epoch_seconds=6.0, timed_from=5)
    assert moved.steps == 7 + 6 and moved.timed_from == 5  # ⌊(19 − 9) / 1.5⌋
    assert "set-up 0.0 s included, 1.5 s a step in its second half;" in moved.describe()
    assert Fit.from_dict(json.loads(json.dumps(moved.to_dict()))) == moved
    old = {k: v for k, v in moved.to_dict().items() if k != "timed_from"}
    assert Fit.from_dict(old).timed_from is None
    assert ", 0.75 s a step in its second half;" in Fit.from_dict(old).describe()
    refitted = budget_fit.refit(moved, config, 13, 15.0, 1, 7, 6.0, 4.5, timed_from=6)
    assert refitted.refits[0]["step_seconds"] == 1.5  # (6 − 4.5) / (7 − 6)


def test_a_fit_recorded_in_whole_epochs_still_reads():
    """A checkpoint's fit from before steps were fitted has no steps: whole epochs."""
    old = Fit.from_dict({"epochs": 5, "recipe_epochs": 10, "budget_s": 20.0,
                         "first_epoch_seconds": 3.5, "setup_seconds": 0.0, "margin": MARGIN,
                         "machine": hardware.record(torch.device("cpu"))})  # fmt: skip
    assert old.total_steps(7) == 35 and old.epochs_trained() == 5.0
    assert "fitted to the time budget: 5 of 10 epochs (the first took 3.5 s" in old.describe()


# -- on a slowed-down clock ------------------------------------------------------------------
def test_a_fitted_run_ends_its_schedule_inside_the_budget_and_an_unfitted_one_is_cut(
    tmp_path, slow_clock
):
    d, budget = 0.5, 20.0
    fitted = speed_config(epochs=10, time_budget_s=budget)
    assert fitted.epochs * STEPS_PER_EPOCH * d > budget  # the configured schedule does not fit
    slow_clock(d)
    lines = []
    records = Trainer(fitted, tmp_path / "fitted", log=lines.append).run()
    # the first epoch: 7 steps of 0.5 s, no set-up time (the clock stands still there);
    # 7 + ⌊(20·0.95 − 3.5) / 0.5⌋ = 7 + 31 = 38 steps: 5 epochs and 3 steps of a sixth
    assert len(records) == 6 and records[-1].get("stopped") is None
    assert records[-1]["step"] == 38
    assert sum(r["seconds"] for r in records) == 38 * d <= budget * (1 - MARGIN)
    assert records[-1]["lr"] == fitted.min_lr  # the schedule ran to its end: decayed
    assert records[-1]["test_error"] is not None  # the last record evaluates the test set
    assert sum("fitted to the time budget: 38 steps, 5.43 of 10 epochs (the first took 3.5 s "
               "of 20 s" in line for line in lines) == 1  # fmt: skip
    assert any(line.startswith("epoch   1/6 ") for line in lines)
    fit = json.loads((tmp_path / "fitted" / rundir.SUMMARY).read_text())["fit"]
    assert (fit["steps"], fit["steps_per_epoch"], fit["epochs"]) == (38, STEPS_PER_EPOCH, 6)
    assert (fit["recipe_epochs"], fit["budget_s"]) == (10, budget)
    assert (fit["first_epoch_seconds"], fit["setup_seconds"], fit["margin"]) == (3.5, 0.0, MARGIN)
    assert fit["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert fit["machine"]["threads"] == 1 and fit["machine"]["device"] == "cpu"

    plain = Trainer(fitted.replace(fit_to_budget=False), tmp_path / "plain", log=quiet).run()
    assert plain[-1]["stopped"] == "time budget" and len(plain) < fitted.epochs
    # cut after step 41 of 70 (41 · 0.5 s > 20 s), its rate still 1 − (41 − 7)/(70 − 7) of α₀
    assert plain[-1]["step"] == 41
    assert plain[-1]["lr"] == pytest.approx(fitted.lr * (1 - 34 / 63))
    # the first epoch trains the same whatever the fit chooses (it lies in the warm-up)
    assert comparable(plain[0]) == comparable(records[0])


def test_a_slow_start_is_not_charged_to_the_rest_of_the_run(tmp_path, slow_clock):
    """The first 3 steps take 1.5 s (kernel choice, caches), the rest 0.5 s: the fit times
    the epoch's last 4 steps and fills the budget to its margin, where the epoch's mean step
    (6.5 / 7 = 0.93 s) would have fitted 20 steps and left 6 s of it unused."""
    clock = slow_clock(0.5)
    clock.slow_steps, clock.slow_step = 3, 1.5
    lines = []
    records = Trainer(speed_config(time_budget_s=20.0), tmp_path, log=lines.append).run()
    # t₁ = 3·1.5 + 4·0.5 = 6.5, t_mid = 4.5: t_step = 0.5; 7 + ⌊(19 − 6.5) / 0.5⌋ = 32
    assert records[-1]["step"] == 32 and records[-1].get("stopped") is None
    assert sum(r["seconds"] for r in records) == 19.0 <= 20.0 * (1 - MARGIN)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert (fit["first_epoch_seconds"], fit["mid_epoch_seconds"]) == (6.5, 4.5)
    assert sum("set-up 0.0 s included, 0.5 s a step in its second half;" in line
               for line in lines) == 1  # fmt: skip


def test_an_epoch_schedule_is_fitted_to_whole_epochs(tmp_path, slow_clock):
    slow_clock(0.5)
    lines = []
    config = speed_config(schedule="cosine", warmup_steps=0)
    records = Trainer(config, tmp_path, log=lines.append).run()
    # 1 + ⌊(19 − 3.5) / 3.5⌋ = 5 epochs; cosine's factor for epoch e of 5 drawn from epoch 2 on
    assert len(records) == 5 and records[-1]["step"] == 5 * STEPS_PER_EPOCH
    assert [r["lr"] for r in records[1:]] == pytest.approx(
        [config.lr * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(1, 5)]
    )
    assert any("fitted to the time budget: 5 of 10 epochs" in line for line in lines)


def test_a_fast_machine_keeps_the_configured_epochs(tmp_path, slow_clock):
    slow_clock(2.0**-10)
    records = Trainer(speed_config(epochs=3), tmp_path, log=quiet).run()
    assert len(records) == 3 and records[-1].get("stopped") is None
    fit = load_checkpoint(tmp_path / rundir.CHECKPOINT)["training"]["fit"]
    assert (fit["epochs"], fit["steps"], fit["recipe_epochs"]) == (3, 3 * STEPS_PER_EPOCH, 3)


def test_a_weight_average_spans_its_horizon_of_the_fitted_run(tmp_path, slow_clock):
    """ema_horizon h: the decay follows the run's length as fitted, 1 − 1/(h·S)."""
    slow_clock(0.5)
    run = Trainer(speed_config(ema_horizon=0.25), tmp_path, log=quiet)
    assert run.ema.decay == pytest.approx(1 - 1 / (0.25 * 10 * STEPS_PER_EPOCH))  # unfitted: 70
    run.run()
    assert run.total_steps == 38 and run.ema.decay == pytest.approx(1 - 1 / (0.25 * 38))
    saved = load_checkpoint(tmp_path / rundir.CHECKPOINT)["training"]["ema"]
    assert saved["decay"] == run.ema.decay and saved["updates"] == 38


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("average", [{}, {"ema_horizon": 0.25}], ids=["live", "ema_horizon"])
def test_the_fit_survives_a_resume_bit_for_bit_on_a_faster_clock(tmp_path, slow_clock, average):
    """Without refits the first epoch's choice is the run's, whatever the speed after a
    resume (with them, a faster machine lengthens the rest: the tests that follow)."""
    config = speed_config(checkpoint_every_steps=1, refit_to_budget=False, **average)
    slow_clock(0.5)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()

    clock = slow_clock(0.5)
    # in the third epoch, after the fit
    crash_at_step(Trainer(config, tmp_path / "crash", log=quiet), 2 * STEPS_PER_EPOCH + 3)
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert saved["fit"]["steps"] == 38 and saved["epoch"] == 2
    # measured again at this speed the first epoch would fit all 10: the saved fit holds
    clock.step = 0.25
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"]
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


# -- refits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [warmup_linear_factor, warmup_cosine_factor])
def test_a_redrawn_schedule_keeps_its_rate_and_ends_its_decay_at_the_new_length(factor):
    warmup, total, r = 10, 100, 0.1
    plain = [factor(s, total, warmup, r) for s in range(200)]
    for at, new in ((40, 70), (40, 160)):
        redrawn = [factor(s, total, warmup, r, [(at, new)]) for s in range(200)]
        assert redrawn[: at + 1] == plain[: at + 1]  # the rate at the redraw is the old one's
        assert all(a > b for a, b in zip(redrawn[at:new], redrawn[at + 1 : new]))
        assert redrawn[new - 1] > r and set(redrawn[new:]) == {r}
    # inside the warm-up a redraw is the schedule drawn over the new length from the start
    redrawn = [factor(s, total, warmup, r, [(5, 60)]) for s in range(200)]
    assert redrawn == [factor(s, 60, warmup, r) for s in range(200)]


def test_a_redrawn_linear_decay_spends_what_is_left_evenly_and_redraws_chain():
    """f(s) = r + (f(a) − r)·(S' − s)/(S' − a) after a redraw (a, S'); a second redraw
    starts from the rate the first left."""
    warmup, total, r = 10, 100, 0.1
    first, second = (40, 70), (55, 90)

    def f(s, redraws):
        return warmup_linear_factor(s, total, warmup, r, redraws)

    for s in range(40, 70):
        assert f(s, [first]) == pytest.approx(r + (f(40, []) - r) * (70 - s) / 30)
    for s in range(55, 90):
        assert f(s, [first, second]) == pytest.approx(r + (f(55, [first]) - r) * (90 - s) / 35)
    assert [f(s, [first, second]) for s in range(56)] == [f(s, [first]) for s in range(56)]


def test_a_later_epoch_refits_the_rest_of_the_run_from_its_own_speed():
    """At the end of epoch 3 of speed_config (s = 21 of the first fit's 38, n = 7, B = 20 s):
    s + ⌊(19 − t_spent) / t_step⌋ from that epoch's mean step, within [s, 70]."""
    config, cpu = speed_config(), torch.device("cpu")
    first = budget_fit.fit(config, STEPS_PER_EPOCH, 3.5, 0.0, cpu)
    assert first.total_steps(STEPS_PER_EPOCH) == 38 and first.refits == ()
    assert budget_fit.refit(first, config, 21, 10.5, 2, 7, 3.5) is None  # steady: as it was
    slower = budget_fit.refit(first, config, 21, 12.25, 2, 7, 5.25)  # 0.75 s a step
    assert slower.total_steps(STEPS_PER_EPOCH) == 21 + 9  # ⌊6.75 / 0.75⌋
    assert slower.refits == ({"epoch": 3, "step": 21, "steps": 30, "was": 38,
                              "spent_seconds": 12.25, "step_seconds": 0.75},)  # fmt: skip
    assert slower.redraws() == [(21, 30)] and slower.first_steps(STEPS_PER_EPOCH) == 38
    assert slower.epochs_trained() == 30 / 7
    faster = budget_fit.refit(first, config, 21, 8.75, 2, 7, 1.75)  # 0.25 s a step
    assert faster.total_steps(STEPS_PER_EPOCH) == 21 + 41  # ⌊10.25 / 0.25⌋
    fastest = budget_fit.refit(first, config, 21, 8.75, 2, 7, 0.7)
    assert fastest.total_steps(STEPS_PER_EPOCH) == 70  # at most the recipe's E·n
    spent = budget_fit.refit(first, config, 21, 19.5, 2, 7, 5.25)  # no room: it ends here
    assert spent.total_steps(STEPS_PER_EPOCH) == 21
    again = budget_fit.refit(slower, config, 28, 16.0, 3, 7, 3.5)  # 0.5 s a step again
    assert again.redraws() == [(21, 30), (28, 34)]  # 28 + ⌊3 / 0.5⌋
    assert Fit.from_dict(json.loads(json.dumps(again.to_dict()))) == again
    epoch_schedule = speed_config(schedule="cosine", warmup_steps=0)
    assert budget_fit.refit(first, epoch_schedule, 21, 12.25, 2, 7, 5.25) is None


def test_a_refit_waits_until_the_drift_moves_the_end_out_of_its_band():
    """The first fit's 38 steps at s = 21, 10.5 s spent: a refit only when 10.5 + 17·t_step
    falls outside [B·(1 − 2·0.05), B·(1 − 0.05/2)] = [18, 19.5]."""
    config, cpu = speed_config(), torch.device("cpu")
    first = budget_fit.fit(config, STEPS_PER_EPOCH, 3.5, 0.0, cpu)
    for t_step in (0.45, 0.5, 0.52, 0.55):  # 18.15, 19, 19.34, 19.85 s
        refitted = budget_fit.refit(first, config, 21, 10.5, 2, 7, 7 * t_step)
        assert (refitted is None) == (t_step < 0.55)
    assert refitted.total_steps(STEPS_PER_EPOCH) == 21 + 15  # ⌊8.5 / 0.55⌋
    faster = budget_fit.refit(first, config, 21, 10.5, 2, 7, 7 * 0.44)  # 17.98 s: too early
    assert faster.total_steps(STEPS_PER_EPOCH) == 21 + 19  # ⌊8.5 / 0.44⌋


def test_a_refit_times_the_second_half_of_its_epoch(tmp_path, slow_clock):
    """The machine slows from 0.5 to 1 s a step after step 17, the middle of epoch 3 (steps
    15-21): that epoch's second half gives 1 s a step where its mean gives 5.5 / 7 = 0.79 s.
    After it (12.5 s spent) the refit ends the run at 21 + ⌊6.5 / 1⌋ = 27 steps, in 18.5 s;
    from the mean it would have chosen 21 + ⌊6.5 / 0.79⌋ = 29 and overrun the budget."""
    config, cpu = speed_config(), torch.device("cpu")
    first = budget_fit.fit(config, STEPS_PER_EPOCH, 3.5, 0.0, cpu)
    halves = budget_fit.refit(first, config, 21, 12.5, 2, 7, 5.5, mid_epoch_seconds=1.5)
    mean = budget_fit.refit(first, config, 21, 12.5, 2, 7, 5.5)
    assert halves.refits[0]["step_seconds"] == 1.0 and halves.total_steps(7) == 27
    assert mean.total_steps(7) == 29
    clock = slow_clock(0.5)
    clock.drift_from, clock.drift_step = 18, 1.0
    records = Trainer(config, tmp_path, log=quiet).run()
    assert records[-1]["step"] == 27 and records[-1].get("stopped") is None
    assert sum(r["seconds"] for r in records) == 18.5 and records[-1]["lr"] == 0.0


def test_a_run_that_slows_down_refits_its_rest_and_ends_inside_the_budget(tmp_path, slow_clock):
    """From step 15 each step takes 0.75 s instead of 0.5: the first fit's 38 steps would
    take 25 s of the 20 s budget. The refit after epoch 3 ends the schedule at step 30, in
    19 s; without refits the budget cuts the run at step 32 with its rate still high."""
    clock = slow_clock(0.5)
    clock.drift_from, clock.drift_step = 15, 0.75
    lines = []
    records = Trainer(speed_config(), tmp_path / "refit", log=lines.append).run()
    assert records[-1]["step"] == 30 and records[-1].get("stopped") is None
    assert records[-1]["lr"] == 0.0 and records[-1]["test_error"] is not None
    assert sum(r["seconds"] for r in records) == 7.0 + 16 * 0.75 == 19.0
    fit = json.loads((tmp_path / "refit" / rundir.SUMMARY).read_text())["fit"]
    assert [(r["epoch"], r["step"], r["steps"], r["was"]) for r in fit["refits"]] == [
        (3, 21, 30, 38)
    ]
    assert [line for line in lines if "re-fitted" in line] == [
        "re-fitted to the time budget after epoch 3: 30 steps (was 38); 0.75 s a step in that "
        "epoch's second half, 12.2 s of 20 s spent"
    ]
    assert any(line.startswith("epoch   4/5 ") for line in lines)

    clock.steps = 0
    plain = Trainer(speed_config(refit_to_budget=False), tmp_path / "plain", log=quiet).run()
    assert plain[-1]["stopped"] == "time budget" and plain[-1]["step"] == 32
    assert plain[-1]["lr"] > 0.1 * speed_config().lr


def test_a_run_that_speeds_up_refits_to_use_its_budget(tmp_path, slow_clock):
    clock = slow_clock(0.5)
    clock.drift_from, clock.drift_step = 15, 0.25
    records = Trainer(speed_config(), tmp_path, log=quiet).run()
    # after epoch 3: 21 + ⌊(19 − 8.75) / 0.25⌋ = 62 steps, in 8.75 + 41 · 0.25 = 19 s
    assert records[-1]["step"] == 62 and records[-1].get("stopped") is None
    assert records[-1]["lr"] == 0.0 and sum(r["seconds"] for r in records) == 19.0


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_refits_survive_a_resume_bit_for_bit(tmp_path, slow_clock):
    """A crash after the refit of epoch 3: the resumed run redraws the schedule the refit
    drew (kept in the checkpoint) and its average's decay, and ends as the uninterrupted run."""
    config = speed_config(checkpoint_every_steps=1, ema_horizon=0.25)
    clock = slow_clock(0.5)
    clock.drift_from, clock.drift_step = 15, 0.75
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()

    clock.steps = 0
    # in the fourth epoch, after the refit
    crash_at_step(Trainer(config, tmp_path / "crash", log=quiet), 3 * STEPS_PER_EPOCH + 3)
    saved = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["training"]
    assert saved["fit"]["refits"][0]["steps"] == 30 and saved["epoch"] == 3
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)
    assert new_state["training"]["fit"] == ref_state["training"]["fit"]
    assert new_state["training"]["ema"]["decay"] == pytest.approx(1 - 1 / (0.25 * 30))
    model = ref_state["model_state"]
    assert all(torch.equal(model[k], new_state["model_state"][k]) for k in model)


def test_a_speedrun_table_names_each_runs_fit_and_machine(tmp_path, slow_clock):
    slow_clock(0.5)
    results = run_speedrun(speed_config(), tmp_path, seeds=2, targets=(50.0,), log=quiet)
    fitted = [(r["seed"], r["epochs"], r["fit"]["steps"]) for r in results]
    assert fitted == [(0, 38 / STEPS_PER_EPOCH, 38), (1, 38 / STEPS_PER_EPOCH, 38)]
    here = hardware.record(torch.device("cpu"))
    assert results[0]["fit"]["machine"] == here
    assert [r["machines"] for r in results] == [[{"step": 0, "machine": here}]] * 2


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_resumed_on_another_machine_keeps_its_fit_and_records_the_move(
    tmp_path, slow_clock, monkeypatch
):
    """Resumed on a machine unlike the one it last trained on, a fitted run keeps its fit and
    ends as the uninterrupted run, but adds the step and the new machine to its trail, says
    so, and the speedrun table names both; resumed again there, it adds nothing."""
    config = speed_config(checkpoint_every_steps=1)
    slow_clock(0.5)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 2 * STEPS_PER_EPOCH + 3)
    here = hardware.record(torch.device("cpu"))
    elsewhere = {**here, "isa": "AVX2", "native_bf16": False, "threads": 2}
    monkeypatch.setattr(hardware, "record", lambda device: elsewhere)
    lines = []

    def log(*args, **_kwargs):
        lines.append(str(args[0]))

    crash_at_step(Trainer(config, tmp_path / "run", log=log), 4, resume=True)
    resumed = Trainer(config, tmp_path / "run", log=log).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    summary = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())
    reference_summary = json.loads((tmp_path / "ref" / rundir.SUMMARY).read_text())
    assert summary["fit"] == reference_summary["fit"]
    assert reference_summary["machines"] == [{"step": 0, "machine": here}]
    moved_at = 2 * STEPS_PER_EPOCH + 2  # the last step checkpointed before the crash
    assert summary["machines"] == [{"step": 0, "machine": here},
                                   {"step": moved_at, "machine": elsewhere}]  # fmt: skip
    said = [line for line in lines if "on another machine" in line]
    assert len(said) == 1 and f"at step {moved_at} " in said[0] and "AVX2, threads 2" in said[0]
    row = {"variant": "binary", "seed": 3, "amp": "off", **summary}
    table = "\n".join(machines_lines([row, {**row, "seed": 4, "amp": "bf16"}]))
    assert f"Trained on {hardware.text(here)}, in float32 (seeds: binary 3)." in table
    assert f"Trained on {hardware.text(here)}, in bf16 (seeds: binary 4)." in table
    assert f"binary seed 3 resumed at step {moved_at} on {hardware.text(elsewhere)}" in table


def move_to_a_slower_machine(monkeypatch, clock: FakeClock, step: float = 1.5,
                             first: float | None = None) -> dict:  # fmt: skip
    """Make the runs from here on train on another machine (AVX2, 2 threads: `hardware.record`)
    whose steps take `step` s on `clock`, its process's first one `first` s (kernel choice,
    caches); returns the machine."""
    elsewhere = {**hardware.record(torch.device("cpu")), "isa": "AVX2", "native_bf16": False,
                 "threads": 2}  # fmt: skip
    monkeypatch.setattr(hardware, "record", lambda device: elsewhere)
    clock.steps, clock.step = 0, step
    clock.slow_steps, clock.slow_step = (1, first) if first is not None else (0, 0.0)
    return elsewhere


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_an_epoch_that_moves_past_its_middle_refits_from_the_new_machines_steps(
    tmp_path, slow_clock, monkeypatch
):
    """Epoch 3 (steps 15-21, middle step 3) trains 5 steps at 0.5 s and moves to a machine
    3x slower: 1.5 s a step, 2 s its process's first. The refit at the epoch's end times the
    new machine's steps after m' = 5 + ⌊2/2⌋ = 6: 1.5 s, so from 13 s spent 13 + ⌊6 / 1.5⌋ = 25
    steps, which end at 19 s. Its window from the middle step would mix the old machine's two
    steps and the new process's first: (2·0.5 + 2 + 1.5) / 4 = 1.125 s, 26 steps, 20.5 s."""
    config = speed_config(checkpoint_every_steps=1)
    clock = slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path, log=quiet), 2 * STEPS_PER_EPOCH + 6)  # 5 of 7
    move_to_a_slower_machine(monkeypatch, clock, 1.5, first=2.0)
    lines = []
    records = Trainer(config, tmp_path, log=lines.append).run(resume=True)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert fit["refits"] == [{"epoch": 3, "step": 21, "steps": 25, "was": 38,
                              "spent_seconds": 13.0, "step_seconds": 1.5}]  # fmt: skip
    assert records[-1]["step"] == 25 and records[-1].get("stopped") is None
    assert records[-1]["lr"] == 0.0
    assert sum(r["seconds"] for r in records) == 19.0 <= 20.0 * (1 - MARGIN)
    assert sum("re-fitted to the time budget after epoch 3: 25 steps (was 38); 1.5 s a step"
               in line for line in lines) == 1  # fmt: skip


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_move_with_under_two_steps_left_waits_for_the_next_epoch_to_refit(
    tmp_path, slow_clock, monkeypatch
):
    """Moved for the last step of epoch 2 (budget 30 s: 57 steps fitted), there is no second
    half to time on the new machine: no refit then, and epoch 3, trained wholly on it at
    1.5 s a step, refits from 19 s spent to 21 + ⌊9.5 / 1.5⌋ = 27 steps, which end at 28 s.
    From the middle step, epoch 2's refit would have taken (3·0.5 + 2) / 4 = 0.875 s a step."""
    config = speed_config(checkpoint_every_steps=1, time_budget_s=30.0)
    clock = slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path, log=quiet), STEPS_PER_EPOCH + 7)  # 6 of 7
    move_to_a_slower_machine(monkeypatch, clock, 1.5, first=2.0)
    lines = []
    records = Trainer(config, tmp_path, log=lines.append).run(resume=True)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert fit["steps"] == 57
    assert fit["refits"] == [{"epoch": 3, "step": 21, "steps": 27, "was": 57,
                              "spent_seconds": 19.0, "step_seconds": 1.5}]  # fmt: skip
    assert [line for line in lines if line.startswith("no refit")] == [
        "no refit to the time budget after epoch 2: it moved to this machine for its last "
        "step, too few to time; the refit waits for the next epoch, which trains wholly on "
        "this machine"
    ]
    assert records[-1]["step"] == 27 and records[-1].get("stopped") is None
    assert sum(r["seconds"] for r in records) == 28.0 <= 30.0 * (1 - MARGIN)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_first_epoch_moved_for_its_last_step_is_fitted_from_its_mean_step(
    tmp_path, slow_clock, monkeypatch
):
    """The fit must be made: 6 steps at 0.5 s and one at 2 s, t₁ = 5 s, give 5/7 s a step and
    7 + ⌊14 / (5/7)⌋ = 26 steps; epoch 2, at 1.5 s a step, refits that to 14 + ⌊3.5 / 1.5⌋ = 16,
    which end at 18.5 s."""
    config = speed_config(checkpoint_every_steps=1)
    clock = slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path, log=quiet), 7)  # 6 of 7
    elsewhere = move_to_a_slower_machine(monkeypatch, clock, 1.5, first=2.0)
    records = Trainer(config, tmp_path, log=quiet).run(resume=True)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert fit["steps"] == 26 and fit["machine"] == elsewhere
    assert (fit["first_epoch_seconds"], fit["mid_epoch_seconds"], fit["timed_from"]) == (
        5.0, None, None)  # fmt: skip
    assert [(r["epoch"], r["steps"], r["step_seconds"]) for r in fit["refits"]] == [(2, 16, 1.5)]
    assert records[-1]["step"] == 16 and sum(r["seconds"] for r in records) == 18.5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_second_crash_after_a_move_keeps_the_epochs_window(tmp_path, slow_clock, monkeypatch):
    """Moved at step 4 of epoch 3 (window from m' = 4 + ⌊3/2⌋ = 5), crashed again after step 6
    and resumed on the same machine: the window and its t_mid stay (in the checkpoint), and
    the run ends as the one that crashed once, refitted from 1.5 s a step to 24 steps."""
    config = speed_config(checkpoint_every_steps=1)
    clock = slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path / "once", log=quiet), 2 * STEPS_PER_EPOCH + 5)
    with monkeypatch.context() as patched:
        move_to_a_slower_machine(patched, clock, 1.5)
        once = Trainer(config, tmp_path / "once", log=quiet).run(resume=True)

    clock.steps, clock.step = 0, 0.5
    crash_at_step(Trainer(config, tmp_path / "twice", log=quiet), 2 * STEPS_PER_EPOCH + 5)
    move_to_a_slower_machine(monkeypatch, clock, 1.5)
    crash_at_step(Trainer(config, tmp_path / "twice", log=quiet), 3, resume=True)
    saved = load_checkpoint(tmp_path / "twice" / rundir.CHECKPOINT)["training"]
    twice = Trainer(config, tmp_path / "twice", log=quiet).run(resume=True)
    summaries = [json.loads((tmp_path / run / rundir.SUMMARY).read_text())
                 for run in ("once", "twice")]  # fmt: skip
    assert [(r["steps"], r["step_seconds"]) for r in summaries[1]["fit"]["refits"]] == [(24, 1.5)]
    assert summaries[0]["fit"] == summaries[1]["fit"]
    assert [comparable(r) for r in twice] == [comparable(r) for r in once]
    assert [r["seconds"] for r in twice] == [r["seconds"] for r in once]
    assert len(summaries[1]["machines"]) == 2 and twice[-1]["step"] == 24
    # the second crash's checkpoint: the move's batch, and t_mid read after step 5 (3.5 s)
    assert (saved["epoch"], saved["sums"]["batch"], saved["sums"]["moved_at"]) == (2, 6, 4)
    assert saved["sums"]["mid_seconds"] == 4 * 0.5 + 1.5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_checkpoint_from_before_moves_were_timed_resumes_on_another_machine(
    tmp_path, slow_clock, monkeypatch
):
    """A checkpoint without the epoch's `moved_at` and the fit's `timed_from` (written before
    they were kept) resumes, and its epoch is timed on the new machine: moved at step 5 of
    epoch 3, from 12.5 s spent at 1.5 s a step to 21 + ⌊6.5 / 1.5⌋ = 25 steps, in 18.5 s."""
    config = speed_config(checkpoint_every_steps=1)
    clock = slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path, log=quiet), 2 * STEPS_PER_EPOCH + 6)
    path = tmp_path / rundir.CHECKPOINT
    record = load_checkpoint(path)
    del record["training"]["sums"]["moved_at"], record["training"]["fit"]["timed_from"]
    save_checkpoint(path, record)
    move_to_a_slower_machine(monkeypatch, clock, 1.5)
    records = Trainer(config, tmp_path, log=quiet).run(resume=True)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert [(r["steps"], r["step_seconds"]) for r in fit["refits"]] == [(25, 1.5)]
    assert records[-1]["step"] == 25 and sum(r["seconds"] for r in records) == 18.5


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("budget", [10.0, 40.0], ids=["shorter", "longer"])
def test_a_fitted_run_resumed_with_another_budget_is_refused_and_kept(tmp_path, slow_clock, budget):
    """Its steps and rates were drawn for its budget: a longer one would go unused, a shorter
    one would cut it with its rate high. Refused before anything is written; the same
    budget resumes. A run resumed inside its first epoch, not fitted yet, fits to the new."""
    config = speed_config(checkpoint_every_steps=1)
    slow_clock(0.5)
    crash_at_step(Trainer(config, tmp_path / "run", log=quiet), 2 * STEPS_PER_EPOCH + 3)
    files = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()}
    other = config.replace(time_budget_s=budget)
    with pytest.raises(
        ConfigError,
        match=f"fitted its schedule to time_budget_s=20 at the end "
        f"of its first epoch, not {budget:g}; resume with time_budget_s=20",
    ):
        Trainer(other, tmp_path / "run", log=quiet).run(resume=True)
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()} == files
    assert Trainer(config, tmp_path / "run", log=quiet).run(resume=True)[-1]["lr"] == 0.0

    crash_at_step(Trainer(config, tmp_path / "early", log=quiet), 4)
    Trainer(other, tmp_path / "early", log=quiet).run(resume=True)
    fit = json.loads((tmp_path / "early" / rundir.SUMMARY).read_text())["fit"]
    assert fit["budget_s"] == budget


# -- choosing the width --------------------------------------------------------------------------
def test_the_width_rule_trains_the_widest_that_fits_its_share_of_the_recipe():
    widths = [1.0, 0.75, 0.5]
    assert width_fit.MIN_SHARE == 0.65  # of 14 epochs: 9.1
    # B·(1 − 0.05) − t_probe = 95 s, 10 steps an epoch: E = 9.5 / t_step
    chosen, predicted = width_fit.choose(widths, [2.0, 1.0, 0.5], 14, 10, 100.0, 0.0)
    assert predicted == pytest.approx([4.75, 9.5, 19.0])
    assert chosen == 0.75  # 9.5 epochs ≥ 9.1; width 1's 4.75 are not
    assert width_fit.choose(widths, [1.0, 0.6, 0.3], 14, 10, 100.0, 0.0)[0] == 1.0  # 9.5 ≥ 9.1
    # half the recipe at width 1 (7.9 epochs) is under the share: width 0.75 trains
    assert width_fit.choose(widths, [1.2, 0.6, 0.3], 14, 10, 100.0, 0.0)[0] == 0.75
    assert width_fit.choose(widths, [9.0, 5.0, 3.0], 14, 10, 100.0, 0.0)[0] == 0.5  # none fits
    # the probe's own seconds come out of the budget: 95 − 38 = 57 s leave width 1 4.75 epochs
    assert width_fit.choose(widths, [1.2, 0.6, 0.3], 14, 10, 100.0, 38.0)[0] == 0.75
    assert width_fit.candidate_widths(0.5) == [0.5, 0.375, 0.25]


@pytest.mark.parametrize(("steps", "says"), [
    ([2.0, 1.0, 0.5], "width 0.75 chosen for the time budget: the widest predicted to train at "
                      "least 65% of the recipe's 14 epochs (width: epochs, 1: 4.8, 0.75: 9.5"),
    ([9.0, 5.0, 3.0], "width 0.5 chosen for the time budget: the narrowest, as none is "
                      "predicted to train 65% of the recipe's 14 epochs (width: epochs, 1: 1.1"),
])  # fmt: skip
def test_the_width_line_says_why_the_width_was_chosen(steps, says):
    widths = [1.0, 0.75, 0.5]
    chosen, predicted = width_fit.choose(widths, steps, 14, 10, 100.0, 0.0)
    fit = width_fit.WidthFit(widths, steps, predicted, 14, chosen, width_fit.MIN_SHARE, 1.5)
    assert says in fit.describe()


class Ticks:
    """A clock that reads 0, 1, 2, … seconds at successive calls."""

    def __init__(self) -> None:
        self.now = -1.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def timed_widths(monkeypatch):
    """`timed_widths(f)`: the width probe measures f(width) seconds a step, in 1 s."""

    def install(seconds_at):
        def measured(config, splits, batch, widths, device):
            assert batch[0].shape[0] == config.batch_size  # the run's first batch
            return [seconds_at(w) for w in widths]

        monkeypatch.setattr(width_fit, "step_seconds", measured)
        monkeypatch.setattr(width_fit, "time", Ticks())

    return install


def rundir_config(run_dir) -> dict:
    return load_toml(run_dir / rundir.CONFIG)


def test_a_run_that_fits_its_width_records_the_width_it_chose(tmp_path, slow_clock,
                                                              timed_widths):  # fmt: skip
    slow_clock(0.5)
    # 20 s · 0.95 − 1 s of probe = 18 s for 7-step epochs: E(w) = 18 / (7 · t_step(w))
    timed_widths(lambda w: {0.125: 0.35, 0.09375: 0.3, 0.0625: 0.2}[w])
    lines = []
    config = speed_config(fit_width=True)
    run = Trainer(config, tmp_path, log=lines.append)
    assert run.config.width == 0.125  # E = 18 / (7 · 0.35) = 7.3 ≥ 6.5 epochs: the widest
    assert sum("width 0.125 chosen for the time budget: the widest predicted to train at "
               "least 65% of the recipe's 10 epochs (width: epochs, 0.125: 7.3, 0.09375: 8.6, "
               "0.0625: 12.9; measured in 1.0 s)" in line for line in lines) == 1  # fmt: skip
    run.run()
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    assert fit["width_fit"]["chosen"] == 0.125 and fit["setup_seconds"] == 1.0
    assert fit["width_fit"]["step_seconds"] == [0.35, 0.3, 0.2]
    assert rundir_config(tmp_path)["fit_width"] is True

    timed_widths(lambda w: 0.5 * w / 0.125)  # slower: width 0.125 fits 5.1, 0.094 6.9 epochs
    narrower = Trainer(config, tmp_path / "slower", log=quiet)
    assert narrower.config.width == 0.09375
    narrower.run()
    assert rundir_config(tmp_path / "slower")["width"] == 0.09375
    assert sum(p.numel() for p in narrower.model.parameters()) < sum(
        p.numel() for p in run.model.parameters()
    )


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_resumed_run_keeps_its_width_and_measures_nothing(tmp_path, slow_clock, timed_widths,
                                                            monkeypatch):  # fmt: skip
    config = speed_config(fit_width=True, checkpoint_every_steps=1)
    slow_clock(0.5)
    timed_widths(lambda w: 0.5 * w / 0.125)  # chooses 0.09375
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    timed_widths(lambda w: 0.5 * w / 0.125)
    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 2 * STEPS_PER_EPOCH + 3:
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()

    def must_not_measure(*_args):
        raise AssertionError("a resumed run measured its width again")

    monkeypatch.setattr(width_fit, "step_seconds", must_not_measure)
    resumed = trainer.train(config, tmp_path / "crash", resume=True, log=quiet)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    assert rundir_config(tmp_path / "crash")["width"] == 0.09375


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_run_resumed_inside_its_first_epoch_counts_the_probe_as_set_up(tmp_path, slow_clock,
                                                                         timed_widths):  # fmt: skip
    config = speed_config(fit_width=True, checkpoint_every_steps=1)
    slow_clock(0.5)
    timed_widths(lambda w: 0.5 * w / 0.125)
    crashing = Trainer(config, tmp_path, log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == 4:  # inside the first epoch, before the fit
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    assert load_checkpoint(tmp_path / rundir.CHECKPOINT)["training"]["fit"] is None
    Trainer(config, tmp_path, log=quiet).run(resume=True)
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    # the probe's 1 s is set-up: the first epoch took 1 + 7 · 0.5 s, and its middle step (the
    # third, saved in the checkpoint before the crash) ended at 1 + 3 · 0.5 s
    assert fit["setup_seconds"] == 1.0 and fit["first_epoch_seconds"] == 4.5
    assert fit["mid_epoch_seconds"] == 2.5 and fit["steps"] == 7 + 29  # ⌊(19 − 4.5) / 0.5⌋
    assert fit["width_fit"]["chosen"] == 0.09375


def test_the_width_probe_leaves_the_run_as_it_would_be_without_it(tmp_path, slow_clock):
    slow_clock(2.0**-10)  # every epoch fits: the fit chooses the same length with or without
    chosen = Trainer(speed_config(epochs=2, fit_width=True), tmp_path / "probed", log=quiet)
    assert chosen.config.width == 0.125  # measured for real: at 2 epochs every width fits
    probed = chosen.run()
    plain = Trainer(speed_config(epochs=2), tmp_path / "plain", log=quiet).run()
    assert [comparable(r) for r in probed] == [comparable(r) for r in plain]


def test_a_width_named_on_the_command_line_is_the_width_trained(tmp_path):
    preset = tmp_path / "preset.toml"  # a preset that fits its width, as the speedrun's does
    preset.write_text("fit_to_budget = true\ntime_budget_s = 60.0\nwarmup_steps = 7\n"
                      "fit_width = true\n")  # fmt: skip
    assert main([*train_args(tmp_path), "--config", str(preset), "--width", "0.0625"]) == 0
    saved = rundir_config(tmp_path / "run")
    assert saved["width"] == 0.0625 and saved["fit_width"] is False


# -- refusals ----------------------------------------------------------------------------------
def train_args(tmp_path, *settings) -> list[str]:
    args = ["train", "--model", "speednet", "--dataset", "synthetic", "--epochs", "2",
            "--out", str(tmp_path / "run"), "--set", "device=cpu", "--set", "threads=1",
            "--set", "schedule=warmup-linear", "--set", "val_images=64",
            "--batch-size", "64"]  # fmt: skip
    for setting in settings:
        args += ["--set", setting]
    return args


@pytest.mark.parametrize(
    "settings, says",
    [
        (("fit_to_budget=true", "time_budget_s=60", "warmup_steps=2"),
         "fit_to_budget chooses the epochs at the end of the first, whose learning rate must "
         "not depend on them, but the warm-up ends at step 2 of its 7; set warmup_steps to at "
         "least 7, or turn fit_to_budget off"),
        (("fit_to_budget=true",),
         "fit_to_budget applies to runs with a time_budget_s, not to a run without "
         "time_budget_s; set it to False"),
        (("fit_to_budget=true", "time_budget_s=60", "max_steps=5"),
         "fit_to_budget chooses the number of epochs, but max_steps sets the run's length; "
         "leave max_steps unset or turn fit_to_budget off"),
        (("fit_width=true", "time_budget_s=60"),
         "fit_width chooses the width from the time budget that fit_to_budget fits the run to; "
         "set fit_to_budget = true as well, or fit_width = false"),
    ],
    ids=["warm-up-inside-the-first-epoch", "no-time-budget", "max-steps", "width-without-fit"],
)  # fmt: skip
def test_a_run_that_cannot_be_fitted_is_refused_in_one_line(tmp_path, capsys, settings, says):
    assert main(train_args(tmp_path, *settings)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run" / rundir.CHECKPOINT).exists()


def test_an_average_with_both_a_decay_and_a_horizon_is_a_config_error():
    with pytest.raises(ConfigError, match="ema_decay .* and ema_horizon .* both set"):
        speed_config(ema_decay=0.99, ema_horizon=0.05).validate()


def test_max_steps_with_a_fit_is_a_config_error():
    with pytest.raises(ConfigError, match="max_steps sets the run's length"):
        speed_config(max_steps=5).validate()
