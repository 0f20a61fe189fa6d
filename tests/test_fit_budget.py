"""`qtrain speedrun --fit-budget`: the rule's arithmetic, a fitted run that ends its schedule
inside its budget on a slowed-down clock, and fit.json read back instead of measured again."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.base.errors import UserError
from qtrain.cli import main
from qtrain.experiments import fit_budget
from qtrain.experiments.fit_budget import (
    FIT_FILE,
    MARGIN,
    OVERHEAD,
    TIMED_STEPS,
    WARMUP_STEPS,
    Probe,
    fit_from,
    fitted_epochs,
    write_fit,
)
from qtrain.experiments.speedrun import BUDGETS, run_speedrun
from qtrain.methods.optimizer import QuantizedOptimizer
from qtrain.train import parts, rundir, state, trainer
from qtrain.train.config import RunConfig, load_toml

PROBE_STEPS = WARMUP_STEPS + TIMED_STEPS
# speed_config with 64 of its 512 synthetic training images held out: 448 // 64 = 7 batches
STEPS_PER_EPOCH = 7
MACHINE = {"cpu": "a CPU", "isa": "AVX2", "native_bf16": False, "threads": 1, "device": "cpu",
           "torch": "2"}  # fmt: skip


def speed_config(**changes) -> RunConfig:
    base = dict(model="speednet", width=0.125, dataset="synthetic", method="bc-adam", epochs=10,
                batch_size=64, lr=0.01, device="cpu", channels_last=False, eval_batch_size=128,
                threads=1, val_images=64, whiten_init=True, schedule="warmup-linear",
                warmup_steps=2, time_budget_s=20.0)  # fmt: skip
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """A clock that stands still except at optimizer steps, each of which takes `step` s."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def slow_clock(monkeypatch):
    """`slow_clock(d)`: every optimizer step takes d seconds on the clock that the probe and
    the trainer read (the records' seconds, the budget, the whitening set-up)."""

    def install(step: float) -> FakeClock:
        clock = FakeClock(step)
        for module in (fit_budget, trainer, state, parts):
            monkeypatch.setattr(module, "time", clock)
        real_step = QuantizedOptimizer.step

        def ticking(self, *args, **kwargs):
            clock.now += clock.step
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(QuantizedOptimizer, "step", ticking)
        return clock

    return install


def stub_probe(monkeypatch, probe: Probe) -> list[RunConfig]:
    """`measure` replaced by one that returns `probe`; the configs it was asked for."""
    asked = []

    def measured(config):
        asked.append(config)
        return probe

    monkeypatch.setattr(fit_budget, "measure", measured)
    return asked


def no_probe(monkeypatch) -> None:
    def refuse(config):
        pytest.fail("the step was measured again")

    monkeypatch.setattr(fit_budget, "measure", refuse)


def fit_json(folder, variant="binary") -> dict:
    return json.loads((folder / variant / FIT_FILE).read_text())


# -- the rule ----------------------------------------------------------------------------------
def test_the_rule_chooses_the_epochs_that_fit_with_its_margin_and_overhead():
    # ⌊(1200·0.95 − 12 − 0.5) / (175 · 0.9 · 1.15)⌋ = ⌊1127.5 / 181.125⌋ = ⌊6.22⌋
    assert (OVERHEAD, MARGIN) == (1.15, 0.05)
    assert fitted_epochs(1200.0, 14, 175, 0.9, 12.0, 0.5) == 6
    assert fitted_epochs(1200.0, 14, 175, 0.3, 12.0, 0.5) == 14  # 18.7 fit: the recipe's 14
    assert fitted_epochs(1200.0, 14, 175, 9.0, 12.0, 0.5) == 1  # not even one: at least one
    assert fitted_epochs(100.0, 50, 10, 1.0, 0.0, 0.0, overhead=1.0, margin=0.0) == 10
    assert fitted_epochs(100.0, 50, 10, 1.0, 0.0, 0.0, overhead=1.0, margin=0.1) == 9
    assert fitted_epochs(100.0, 50, 10, 1.0, 5.0, 6.0, overhead=1.0, margin=0.0) == 8


def test_a_fit_records_the_rule_its_inputs_and_the_fitted_budget():
    config = speed_config(epochs=14, time_budget_s=1200.0)
    fit = fit_from(config, Probe(0.9, 0.5, 175, 12.0, MACHINE))
    assert (fit.epochs, fit.recipe_epochs, fit.budget_s, fit.time_budget_s) == (6, 14, 1200.0,
                                                                                1188.0)  # fmt: skip
    assert (fit.step_seconds, fit.overhead, fit.margin) == (0.9, OVERHEAD, MARGIN)
    assert (fit.probe_seconds, fit.setup_seconds, fit.steps_per_epoch) == (12.0, 0.5, 175)
    assert (fit.warmup_steps, fit.timed_steps, fit.machine) == (3, 10, MACHINE)
    assert fit.recipe["epochs"] == 14 and "seed" not in fit.recipe and "threads" not in fit.recipe
    with pytest.raises(UserError, match="took 1300.0 s, the whole time budget of 1200 s"):
        fit_from(config, Probe(0.9, 0.5, 175, 1300.0, MACHINE))


# -- on a slowed-down clock ------------------------------------------------------------------
def test_a_fitted_run_ends_its_schedule_inside_the_budget(tmp_path, slow_clock):
    d, budget = 0.5, 20.0
    recipe = speed_config(epochs=10, time_budget_s=budget)
    assert recipe.epochs * STEPS_PER_EPOCH * d > budget  # the recipe's schedule does not fit
    slow_clock(d)
    lines = []
    run_speedrun(recipe, tmp_path / "fitted", targets=(50.0,), fit_budget=True, log=lines.append)
    folder = tmp_path / "fitted" / "speedrun-full"
    fit = fit_json(folder)
    # the probe read the slowed clock: each step d, the probe 13 steps, no other time passed
    assert fit["step_seconds"] == d and fit["probe_seconds"] == PROBE_STEPS * d
    assert fit["setup_seconds"] == 0.0 and fit["steps_per_epoch"] == STEPS_PER_EPOCH
    # ⌊(20·0.95 − 6.5) / (7 · 0.5 · 1.15)⌋ = ⌊12.5 / 4.025⌋ = 3 epochs, budget 20 − 6.5
    assert (fit["epochs"], fit["recipe_epochs"], fit["time_budget_s"]) == (3, 10, 13.5)
    assert fit["machine"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert fit["machine"]["threads"] == 1 and fit["machine"]["device"] == "cpu"
    assert sum("binary fitted to this machine: 3 of 10 epochs" in line for line in lines) == 1

    run = folder / "binary" / "seed0"
    records = rundir.read_metrics(run)
    assert len(records) == 3 < recipe.epochs
    assert records[-1].get("stopped") is None and records[-1]["step"] == 3 * STEPS_PER_EPOCH
    assert sum(r["seconds"] for r in records) == 3 * STEPS_PER_EPOCH * d <= fit["time_budget_s"]
    saved = load_toml(run / rundir.CONFIG)
    assert (saved["epochs"], saved["time_budget_s"]) == (3, 13.5)

    # the same recipe unfitted, on the same clock, is cut by its budget
    run_speedrun(recipe, tmp_path / "plain", targets=(50.0,), log=quiet)
    plain = rundir.read_metrics(tmp_path / "plain" / "speedrun-full" / "binary" / "seed0")
    assert plain[-1]["stopped"] == "time budget" and len(plain) < recipe.epochs


def test_a_fast_machine_keeps_the_recipes_epochs(tmp_path, slow_clock):
    d = 2.0**-10
    slow_clock(d)
    recipe = speed_config(epochs=2, time_budget_s=20.0)
    run_speedrun(recipe, tmp_path, targets=(50.0,), fit_budget=True, log=quiet)
    fit = fit_json(tmp_path / "speedrun-full")
    assert (fit["epochs"], fit["time_budget_s"]) == (2, 20.0 - PROBE_STEPS * d)
    records = rundir.read_metrics(tmp_path / "speedrun-full" / "binary" / "seed0")
    assert len(records) == 2 and records[-1].get("stopped") is None


# -- fit.json ----------------------------------------------------------------------------------
def test_a_second_invocation_reads_the_fit_and_measures_nothing(tmp_path, monkeypatch):
    stub_probe(monkeypatch, Probe(0.5, 0.0, STEPS_PER_EPOCH, 6.5, MACHINE))
    recipe = speed_config(epochs=10, time_budget_s=20.0, whiten_init=False)
    first = run_speedrun(recipe, tmp_path, targets=(50.0,), fit_budget=True, log=quiet)
    folder = tmp_path / "speedrun-full"
    written = (folder / "binary" / FIT_FILE).read_bytes()
    fitted = json.loads(written)
    assert fitted["epochs"] == 3 and fitted["time_budget_s"] == 13.5

    no_probe(monkeypatch)
    lines = []
    again = run_speedrun(recipe, tmp_path, seeds=2, targets=(50.0,), fit_budget=True,
                         log=lines.append)  # fmt: skip
    assert (folder / "binary" / FIT_FILE).read_bytes() == written
    assert any("skip" in line and "seed0" in line for line in lines)  # read back, not trained
    assert any(f"read from {folder / 'binary' / FIT_FILE}" in line for line in lines)
    assert again[0] == first[0] and [r["seed"] for r in again] == [0, 1]
    for seed in (0, 1):  # both seeds run the fitted schedule
        saved = load_toml(folder / "binary" / f"seed{seed}" / rundir.CONFIG)
        assert (saved["epochs"], saved["time_budget_s"]) == (3, 13.5)


def test_each_variant_is_fitted_on_its_own_model(tmp_path, monkeypatch, fake_training):
    asked = stub_probe(monkeypatch, Probe(0.5, 0.25, STEPS_PER_EPOCH, 6.5, MACHINE))
    recipe = speed_config(epochs=10, time_budget_s=60.0)
    run_speedrun(recipe, tmp_path, variants=("binary", "float", "paper"), paper_epochs=12,
                 targets=(50.0,), fit_budget=True, log=quiet)  # fmt: skip
    models = [("speednet", "bc-adam", 10), ("speednet", "fp-adam", 10), ("vgg9", "bc-adam", 12)]
    assert [(c.model, c.method, c.epochs) for c in asked] == models
    # ⌊(60·0.95 − 6.5 − 0.25) / 4.025⌋ = 12 epochs: the recipe's 10, the paper's 12
    assert [c.epochs for c, _ in fake_training] == [10, 10, 12]
    assert {c.time_budget_s for c, _ in fake_training} == {53.5}
    for variant, model in zip(("binary", "float", "paper"), models):
        recipe = fit_json(tmp_path / "speedrun-full", variant)["recipe"]
        assert (recipe["model"], recipe["method"], recipe["epochs"]) == model


def fit_args(out, *extra) -> list[str]:
    return ["speedrun", "--fit-budget", "--budget", "smoke", "--set", "device=cpu",
            "--set", "threads=1", "--out", str(out), *extra]  # fmt: skip


def smoke_recipe(**changes) -> RunConfig:
    """The preset under the smoke budget, as `fit_args` runs it."""
    values = {**load_toml("speedrun-binary"), **BUDGETS["smoke"].settings, "device": "cpu",
              "threads": 1, "download": True, **changes}  # fmt: skip
    return RunConfig(**values)


@pytest.mark.parametrize(
    "content, says",
    [
        (b"{not json", "is not a fit record (not JSON)"),
        (b"[1, 2]", "is not a fit record (not a JSON object)"),
        (b'{"epochs": 3}', "is not a fit record (it lacks 'budget_s')"),
    ],
    ids=["not-json", "not-an-object", "incomplete"],
)
def test_a_damaged_fit_json_is_one_line(tmp_path, monkeypatch, capsys, content, says):
    no_probe(monkeypatch)
    path = tmp_path / "speedrun-smoke" / "binary" / FIT_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert main(fit_args(tmp_path)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and f"{path} {says}" in err[0] and captured.out == ""
    assert "delete it to measure again, or choose another --out folder" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["binary", FIT_FILE, "speedrun-smoke"]


def test_a_fit_of_another_recipe_is_refused_and_another_seed_reuses_it(
    tmp_path, monkeypatch, capsys, fake_training
):
    path = tmp_path / "speedrun-smoke" / "binary" / FIT_FILE
    write_fit(path, fit_from(smoke_recipe(), Probe(0.5, 0.0, 7, 6.5, MACHINE)))
    no_probe(monkeypatch)
    assert main(fit_args(tmp_path, "--time-budget", "600")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and (
        f"{path} was fitted for a recipe with time_budget_s=1200.0, not 600.0; delete it to "
        "measure again, or choose another --out folder") in err[0]  # fmt: skip
    assert main(fit_args(tmp_path, "--lr", "0.02")) == 2
    assert "with lr=0.01, not 0.02" in capsys.readouterr().err
    # a fit holds for every seed of the recipe, and on another number of threads
    assert main(fit_args(tmp_path, "--seed", "5", "--set", "threads=2")) == 0
    assert [(c.seed, c.epochs, c.time_budget_s) for c, _ in fake_training] == [(5, 1, 1193.5)]


def test_a_fitted_folder_is_not_continued_without_fit_budget(tmp_path, monkeypatch, capsys):
    no_probe(monkeypatch)
    path = tmp_path / "speedrun-smoke" / "binary" / FIT_FILE
    write_fit(path, fit_from(smoke_recipe(), Probe(0.5, 0.0, 7, 6.5, MACHINE)))
    assert main([a for a in fit_args(tmp_path) if a != "--fit-budget"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qtrain: error: {path} holds the fit of the runs beside it; add --fit-budget "
                   "to continue them, or choose another --out folder"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["binary", FIT_FILE, "speedrun-smoke"]


def test_fit_budget_needs_a_time_budget_and_epochs(tmp_path, monkeypatch, capsys):
    no_probe(monkeypatch)
    assert main(fit_args(tmp_path, "--set", "time_budget_s=none")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qtrain: error: --fit-budget fits the schedule into the time budget, but the "
                   "recipe has none; set --time-budget"]  # fmt: skip
    with pytest.raises(UserError, match="the recipe's length is set by max_steps"):
        run_speedrun(speed_config(max_steps=5), tmp_path, fit_budget=True, log=quiet)
    assert list(tmp_path.iterdir()) == []
