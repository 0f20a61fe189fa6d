"""Progressive resizing (`qtrain.train.resizing`): the side schedule, the downscaling, a run
whose batches reach the model at each epoch's side and whose records name it, a resume that
trains the same sides, its FLOPs summed side by side, a time-budget fit that prices the larger
later epochs, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.cli import main
from qtrain.models.speednet import speednet
from qtrain.train import parts, rundir, side_cost, state, trainer
from qtrain.train.budget_fit import MARGIN, fitted_steps, resized_epoch_cost
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import ConfigError, RunConfig
from qtrain.train.flops import StepCost, cumulative_training_flops, training_flop_per_image
from qtrain.train.preflight import check_applicable
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.resizing import downscale, side_at
from qtrain.train.side_cost import SideCost, measure_side_cost
from qtrain.train.trainer import Trainer

STEPS_PER_EPOCH = 7  # 512 synthetic images less 64 held out, batches of 64


def resized_config(**changes) -> RunConfig:
    base = dict(model="speednet", width=0.125, dataset="synthetic", method="bc-adam", epochs=4,
                batch_size=64, lr=0.01, device="cpu", channels_last=True, eval_batch_size=128,
                threads=1, val_images=64, whiten_init=True, schedule="warmup-linear",
                warmup_steps=STEPS_PER_EPOCH, resize_min_side=16,
                resize_until=0.5)  # fmt: skip
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


# -- the side schedule and the downscaling -----------------------------------------------------
def test_the_side_grows_linearly_from_the_smallest_to_the_full_one_by_the_given_fraction():
    sides = [side_at(e, 14, 32, 16, 0.5) for e in range(14)]
    # 16 + 16·e/7, rounded, up to epoch 7 = 0.5·14; 32 from there on
    assert sides == [16, 18, 21, 23, 25, 27, 30, 32, 32, 32, 32, 32, 32, 32]
    assert sides == sorted(sides)
    assert [side_at(e, 4.5, 32, 24, 1.0) for e in range(5)] == [24, 26, 28, 29, 31]
    assert side_at(0, 0.5, 32, 24, 0.5) == 24  # a run shorter than an epoch starts small
    assert [side_at(e, 10, 32, None, 0.5) for e in (0, 9)] == [32, 32]  # off


def test_downscaling_averages_keeps_the_layout_and_leaves_the_full_side_alone():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    images = images.contiguous(memory_format=torch.channels_last)
    small = downscale(images, 16)
    assert small.shape == (4, 3, 16, 16)
    assert small.is_contiguous(memory_format=torch.channels_last)
    # halving with antialiasing averages each 2×2 block (bilinear's triangle filter at scale
    # 2 spans a 4×4 neighbourhood with weights ⅛, ⅜, ⅜, ⅛ per axis): the mean is kept
    assert small.mean().item() == pytest.approx(images.mean().item(), abs=2e-2)
    assert small.std() < images.std()  # the noise is averaged down, not sampled
    constant = torch.full((2, 3, 32, 32), 1.5)
    assert torch.allclose(downscale(constant, 20), torch.full((2, 3, 20, 20), 1.5))
    assert downscale(images, 32) is images


# -- a run ---------------------------------------------------------------------------------------
def test_each_epoch_trains_at_its_side_and_its_record_names_it(tmp_path, monkeypatch):
    seen: list[tuple[int, ...]] = []
    real_step = Trainer.optimizer_step

    def watching(self, x, y):
        seen.append(tuple(x.shape[-2:]))
        assert x.is_contiguous(memory_format=torch.channels_last)
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "optimizer_step", watching)
    lines = []
    records = Trainer(resized_config(), tmp_path, log=lines.append).run()
    expected = [side_at(e, 4, 32, 16, 0.5) for e in range(4)]
    assert expected == [16, 24, 32, 32]
    assert [r["image_side"] for r in records] == expected
    assert seen == [(s, s) for s in expected for _ in range(STEPS_PER_EPOCH)]
    assert any(line.startswith("epoch   1/4 ") and "side 16" in line for line in lines)


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in MEASURED_KEYS}


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_a_resumed_run_trains_the_sides_and_numbers_of_an_uninterrupted_one(tmp_path):
    config = resized_config(checkpoint_every_steps=1)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()
    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == STEPS_PER_EPOCH + 3:  # inside the second epoch, at side 24
            raise RuntimeError("simulated crash")
        return real_step()

    crashing.optimizer.step = step_then_crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert [comparable(r) for r in resumed] == [comparable(r) for r in reference]
    ref_state = load_checkpoint(tmp_path / "ref" / rundir.CHECKPOINT)["model_state"]
    new_state = load_checkpoint(tmp_path / "crash" / rundir.CHECKPOINT)["model_state"]
    assert all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)


# -- FLOPs -----------------------------------------------------------------------------------
def test_training_flops_are_summed_epoch_by_epoch_at_each_epochs_side():
    config = resized_config()
    per_side = {s: training_flop_per_image(config, s) for s in (16, 24, 32)}
    assert per_side[16] < per_side[24] < per_side[32] == training_flop_per_image(config)
    records = [{"step": 7, "image_side": 16}, {"step": 14, "image_side": 24},
               {"step": 21, "image_side": 32}, {"step": 24, "image_side": 32}]  # fmt: skip
    b = config.batch_size
    assert cumulative_training_flops(config, records) == [
        7 * b * per_side[16],
        7 * b * (per_side[16] + per_side[24]),
        7 * b * (per_side[16] + per_side[24] + per_side[32]),
        b * (7 * (per_side[16] + per_side[24] + per_side[32]) + 3 * per_side[32]),
    ]
    plain = [{"step": 7}, {"step": 14}]  # a run without resizing trains at the data's side
    assert cumulative_training_flops(config, plain) == [7 * b * per_side[32], 14 * b * per_side[32]]
    assert StepCost(config, reference=16)(32) == per_side[32] / per_side[16]


# -- the time-budget fit -----------------------------------------------------------------------
def test_the_fit_without_costs_is_the_closed_form_and_with_costs_prices_each_epoch():
    flat = lambda epoch, steps: 1.0  # noqa: E731
    for first, grain in ((125.5, 1), (125.5, 100), (40.0, 1), (1100.0, 1), (1300.0, 100)):
        assert fitted_steps(1200.0, 14, 100, first, 0.5, grain, epoch_cost=flat) == fitted_steps(
            1200.0, 14, 100, first, 0.5, grain
        )
    # every later epoch costs twice the first's 1 s a step: (190 − 100) / 2 = 45 more steps
    double = lambda epoch, steps: 2.0  # noqa: E731
    assert fitted_steps(200.0, 14, 100, 100.0, 0.0, margin=0.05, epoch_cost=double) == 145


@pytest.fixture
def flop_clock(monkeypatch):
    """A machine whose speed is its FLOPs: every optimizer step takes d × F(side of its batch)
    / F(16) seconds on the clock the trainer reads, and the measured forward and backward
    passes (`side_cost`) report the same."""

    class Clock:
        now = 0.0

        @staticmethod
        def perf_counter() -> float:
            return Clock.now

    for module in (trainer, state, parts, side_cost):
        monkeypatch.setattr(module, "time", Clock)
    real_step = Trainer.optimizer_step

    def install(d: float, config: RunConfig):
        flops = StepCost(config, reference=16)

        def ticking(self, x, y):
            Clock.now += d * flops(x.shape[-1])
            return real_step(self, x, y)

        def passes(_model, _images, _labels, sides, _amp, _device):
            return {side: d * flops(side) for side in sides}

        monkeypatch.setattr(Trainer, "optimizer_step", ticking)
        monkeypatch.setattr(side_cost, "forward_backward_seconds", passes)
        return flops

    return install


def test_a_fitted_resized_run_ends_inside_its_budget_where_a_flat_fit_would_overrun(
    tmp_path, flop_clock
):
    d, budget = 0.5, 30.0
    config = resized_config(epochs=12, time_budget_s=budget, fit_to_budget=True)
    flops = flop_clock(d, config)
    lines = []
    records = Trainer(config, tmp_path, log=lines.append).run()
    seconds = sum(r["seconds"] for r in records)
    assert records[-1].get("stopped") is None and records[-1]["lr"] == config.min_lr
    assert seconds <= budget * (1 - MARGIN)
    assert records[0]["image_side"] == 16 and records[-1]["image_side"] == 32
    fit = json.loads((tmp_path / rundir.SUMMARY).read_text())["fit"]
    measured = SideCost(**fit["side_cost"])
    assert (measured.share, measured.full_ratio) == (1.0, pytest.approx(flops(32)))
    assert any("a step at side 32 costs" in line for line in lines)
    # the fit took the most steps whose predicted seconds fit: here the prediction is exact
    cost = resized_epoch_cost(config, STEPS_PER_EPOCH, measured)
    assert [cost(e, 40) for e in range(6)] == pytest.approx(
        [flops(side_at(e, 40 / 7, 32, 16, 0.5)) for e in range(6)]
    )
    steps = records[-1]["step"]
    assert steps == fitted_steps(budget, 12, STEPS_PER_EPOCH, 7 * d, 0.0, epoch_cost=cost)
    # priced as if every step cost the first epoch's, the run would have been longer
    assert fitted_steps(budget, 12, STEPS_PER_EPOCH, 7 * d, 0.0) > steps


def test_measuring_the_side_cost_leaves_the_run_untouched():
    torch.manual_seed(0)
    model = speednet(num_classes=10, width=0.125, in_channels=3)
    model.train()(torch.randn(8, 3, 32, 32))  # batch-norm statistics away from their start
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (torch.randn(16, 3, 32, 32), torch.randint(10, (16,)))
    rng = torch.get_rng_state()
    measured = measure_side_cost(model, batch, 16, 32, 0.01, "off", torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert measured.full_ratio > 0 and 0 < measured.share <= 1 and measured.seconds > 0
    assert (measured.min_side, measured.full_side) == (16, 32)


# -- refusals ----------------------------------------------------------------------------------
def train_args(tmp_path, *settings) -> list[str]:
    args = ["train", "--model", "speednet", "--dataset", "synthetic", "--epochs", "2",
            "--out", str(tmp_path / "run"), "--set", "device=cpu", "--set", "threads=1",
            "--set", "val_images=64", "--batch-size", "64"]  # fmt: skip
    for setting in settings:
        args += ["--set", setting]
    return args


@pytest.mark.parametrize(
    "settings, says",
    [
        (("resize_min_side=32",),
         "resize_min_side 32 is not below the 32×32 images of data set 'synthetic', so "
         "nothing would be resized; set it below 32 or unset it"),
        (("resize_min_side=8",),
         "model 'speednet' cannot take 8×8 images (its pooling leaves nothing at that side); "
         "raise resize_min_side towards 32"),
        (("resize_min_side=0",),
         "resize_min_side must be a whole number of pixels >= 1, got 0"),
        (("resize_min_side=24", "resize_until=0"),
         "resize_until must be in (0, 1] (a fraction of the run), got 0"),
        (("resize_until=0.3",),
         "resize_until applies to runs that set resize_min_side"),
    ],
    ids=["not-smaller", "too-small-for-the-model", "zero", "until-zero", "until-alone"],
)  # fmt: skip
def test_an_impossible_resizing_is_refused_in_one_line(tmp_path, capsys, settings, says):
    assert main(train_args(tmp_path, *settings)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "run" / rundir.CHECKPOINT).exists()


def test_resizing_is_refused_on_text():
    with pytest.raises(ConfigError, match="resize_min_side applies to image data sets"):
        check_applicable(RunConfig(model="gpt", dataset="shakespeare-char", resize_min_side=8))
