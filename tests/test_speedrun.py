"""The fast-training options inside the trainer (each does what its docstring states, and a
run using them resumes bit for bit), the per-step schedules, and `qtrain speedrun`."""

from __future__ import annotations

import json

import pytest
import torch

from qtrain.base import cpu_isa
from qtrain.cli import main
from qtrain.data.holdout import sample_images, validation_loader
from qtrain.evaluate import evaluate_file
from qtrain.experiments import speedrun
from qtrain.experiments.speedrun import (
    accuracy_curve,
    epochs_cell,
    float_variant,
    flops_to,
    minutes_to,
    models_cell,
    narrower_hint,
    paper_variant,
    run_speedrun,
    share_cores,
)
from qtrain.export import load, save_packed
from qtrain.models.whitening import image_patches, whitening_filters
from qtrain.report.tables import format_cell
from qtrain.train import rundir
from qtrain.train.budget_fit import Fit
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.ema import WeightEMA
from qtrain.train.evaluation import evaluate
from qtrain.train.flops import training_flop_per_image
from qtrain.train.parts import WHITEN_IMAGES
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.schedules import cycled_momentum, warmup_linear_factor
from qtrain.train.trainer import Trainer

TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in
ALL_OPTIONS = dict(
    whiten_init=True,
    label_smoothing=0.2,
    ema_decay=0.9,
    tta="flip-translate",
    val_images=64,
    schedule="warmup-linear",
    warmup_steps=3,
    momentum_min=0.8,
)


def speed_config(**changes) -> RunConfig:
    base = dict(
        model="speednet",
        width=0.125,
        dataset="synthetic",  # 512 + 128 images made at speednet's 32×32
        method="bc-adam",
        epochs=2,
        batch_size=64,
        lr=0.01,
        device="cpu",
        channels_last=False,
        eval_batch_size=128,
        threads=1,
    )
    return RunConfig(**{**base, **changes})


def quiet(*_args, **_kwargs):
    pass


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def saved(run_dir) -> dict:
    return load_checkpoint(run_dir / rundir.CHECKPOINT)


@pytest.mark.parametrize(
    "options",
    [
        dict(ALL_OPTIONS),
        dict(method="sr-adam", ema_decay=0.8, tta="flip"),
        dict(method="fp-sgd", label_smoothing=0.1, schedule="warmup-linear", momentum_min=0.5),
    ],
    ids=["all-options-bc", "ema-sr", "smoothing-momentum-fp"],
)
def test_a_run_with_the_options_resumes_bit_identically(tmp_path, options, monkeypatch):
    config = speed_config(checkpoint_every_steps=3, **options)
    reference = Trainer(config, tmp_path / "ref", log=quiet).run()

    crashing = Trainer(config, tmp_path / "crash", log=quiet)
    real_step, calls = crashing.optimizer.step, {"n": 0}

    def step_then_crash():
        calls["n"] += 1
        if calls["n"] == len(crashing.train_loader) + 5:  # epoch 2, after its batch-3 save
            raise RuntimeError("simulated crash")
        return real_step()

    monkeypatch.setattr(crashing.optimizer, "step", step_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.run()
    assert saved(tmp_path / "crash")["training"]["sums"]["batch"] == 3

    resumed = Trainer(config, tmp_path / "crash", log=quiet).run(resume=True)
    assert comparable(resumed) == comparable(reference)
    a, b = saved(tmp_path / "crash"), saved(tmp_path / "ref")
    for key, value in b["model_state"].items():
        assert torch.equal(a["model_state"][key], value), key
    if config.ema_decay:
        for key, value in b["training"]["ema"]["averages"].items():
            assert torch.equal(a["training"]["ema"]["averages"][key], value), key


def test_validation_split_is_never_trained_on_and_the_test_set_is_read_once(tmp_path):
    trainer = Trainer(speed_config(val_images=64), tmp_path, log=quiet)
    assert len(trainer.splits.train) == 512 - 64 and len(trainer.held_out) == 64
    trained = {tuple(x.flatten().tolist()) for x in trainer.splits.train.images}
    assert all(tuple(x.flatten().tolist()) not in trained for x in trainer.held_out.images)
    metrics = trainer.run()
    assert all(m["val_error"] is not None for m in metrics)
    assert [m["test_error"] is None for m in metrics] == [True, False]


def test_evaluation_uses_the_weight_average_tta_and_plain_cross_entropy(tmp_path):
    config = speed_config(ema_decay=0.9, label_smoothing=0.3, tta="flip")
    trainer = Trainer(config, tmp_path, log=quiet)
    last = trainer.run()[-1]
    with trainer.ema.applied() as model:
        averaged = evaluate(
            model, trainer.test_loader, trainer.device, trainer.config.amp, tta="flip"
        )
        plain = evaluate(model, trainer.test_loader, trainer.device)
    live = evaluate(trainer.model, trainer.test_loader, trainer.device, tta="flip")
    assert plain["loss"] != averaged["loss"]
    assert (last["test_loss"], last["test_error"]) == (averaged["loss"], averaged["error"])
    assert averaged["loss"] != live["loss"]
    # the average restored from the checkpoint is the one evaluated
    again = WeightEMA(trainer.model, trainer.optimizer, 0.9)
    again.load_state_dict(saved(tmp_path)["training"]["ema"])
    assert again.updates == 2 * len(trainer.train_loader)


def test_only_the_last_evaluation_is_augmented_without_tta_each_epoch(tmp_path, monkeypatch):
    """Per-epoch evaluations are progress (one view); the last record, the one reported,
    keeps the run's test-time augmentation."""
    from qtrain.train import trainer as trainer_module

    views = []
    real = trainer_module.evaluate

    def counting(model, loader, device, amp="off", *, dist=None, tta="none"):
        views.append(tta)
        return real(model, loader, device, amp, dist=dist, tta=tta)

    monkeypatch.setattr(trainer_module, "evaluate", counting)
    config = speed_config(val_images=64, tta="flip", tta_each_epoch=False, epochs=3)
    metrics = Trainer(config, tmp_path / "once", log=quiet).run()
    assert views == ["none", "none", "flip", "flip"]  # val, val, then val and test at the end
    views.clear()
    every = speed_config(val_images=64, tta="flip", epochs=3)
    reference = Trainer(every, tmp_path / "every", log=quiet).run()
    assert views == ["flip", "flip", "flip", "flip"]
    assert metrics[-1]["val_error"] == reference[-1]["val_error"]
    assert metrics[-1]["test_loss"] == reference[-1]["test_loss"]


def test_a_saved_run_evaluates_and_exports_with_its_reported_weights(tmp_path):
    """`qtrain eval` and `qtrain export` use the weights the run's numbers were measured with:
    Q(EMA(w_r)) and the run's TTA, not the live weights. Channels-last, the layout a packed
    file is evaluated in, so that its loss is the run's to the bit."""
    config = speed_config(ema_decay=0.9, tta="flip", scale="he", channels_last=True)
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    last = trainer.run()[-1]
    reported = evaluate_file(tmp_path / "run")
    assert (reported["test_loss"], reported["test_error"], reported["tta"]) == (
        last["test_loss"], last["test_error"], "flip")  # fmt: skip
    live = evaluate(trainer.model, trainer.test_loader, trainer.device, trainer.config.amp)
    live_file = evaluate_file(tmp_path / "run", tta="none", weights="live")
    assert (live_file["test_loss"], live_file["test_error"]) == (live["loss"], live["error"])
    assert live_file["test_loss"] != reported["test_loss"]
    # the deployed model holds Q_d of the averaged latent weights, on the he-scaled grid
    model = load(tmp_path / "run")
    with trainer.ema.applied() as averaged:
        expected = {n: t.clone() for n, t in averaged.state_dict().items()}
    for name in trainer.quantized_names:
        assert torch.equal(model.state_dict()[name], expected[name]), name
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "run" / rundir.CHECKPOINT))
    packed = evaluate_file(tmp_path / "m.safetensors")
    assert (packed["test_loss"], packed["test_error"]) == (last["test_loss"], last["test_error"])
    with pytest.raises(ValueError, match="packed file, which holds only"):
        evaluate_file(tmp_path / "m.safetensors", weights="live")
    with pytest.raises(ValueError, match="did you mean 'live'"):
        evaluate_file(tmp_path / "run", weights="lve")
    with pytest.raises(ValueError, match="unknown tta"):
        evaluate_file(tmp_path / "run", tta="flips")


def test_eval_on_the_validation_split_reads_the_images_the_run_held_out(tmp_path):
    """`split="val"` rebuilds the held-out images from the run's seed: with the run's own
    weights and TTA it gives the last record's val_error and val_loss to the bit, and with
    the live weights what those weights score there; a run without a split is refused."""
    config = speed_config(ema_decay=0.9, tta="flip", val_images=64, seed=3)
    trainer = Trainer(config, tmp_path / "run", log=quiet)
    last = trainer.run()[-1]
    reported = evaluate_file(tmp_path / "run", split="val")
    assert (reported["val_loss"], reported["val_error"]) == (last["val_loss"], last["val_error"])
    assert (reported["split"], reported["images"]) == ("val", 64)
    assert "test_error" not in reported
    live = evaluate(
        trainer.model, trainer.val_loader, trainer.device, trainer.config.amp, tta="flip"
    )
    live_file = evaluate_file(tmp_path / "run", split="val", weights="live")
    assert (live_file["val_loss"], live_file["val_error"]) == (live["loss"], live["error"])
    Trainer(speed_config(), tmp_path / "plain", log=quiet).run()
    with pytest.raises(ValueError, match="held out no validation images"):
        evaluate_file(tmp_path / "plain", split="val")
    with pytest.raises(ValueError, match="did you mean 'val'"):
        evaluate_file(tmp_path / "run", split="vl")


def test_whitening_initialisation_whitens_the_drawn_training_images(tmp_path):
    first = Trainer(speed_config(whiten_init=True), tmp_path / "a", log=quiet)
    second = Trainer(speed_config(whiten_init=True), tmp_path / "b", log=quiet)
    plain = Trainer(speed_config(), tmp_path / "c", log=quiet)
    assert torch.equal(first.model.whiten.weight, second.model.whiten.weight)
    assert not torch.equal(first.model.whiten.weight, plain.model.whiten.weight)
    # the filters are those of the patches of the training images the "whitening" stream drew
    drawn = sample_images(first.splits, WHITEN_IMAGES, 0, "whitening")
    assert len(drawn) == 512 - 64 if first.held_out is not None else len(drawn) == 512
    x = next(iter(validation_loader(first.splits, drawn, len(drawn), seed=0).epoch(0)))[0]
    expected = whitening_filters(image_patches(x, 2)).float().reshape(24, 3, 2, 2)
    assert torch.equal(first.model.whiten.weight, expected)


def test_whiten_init_on_a_model_without_the_layer_is_refused_before_any_data(tmp_path):
    with pytest.raises(ValueError, match="whiten_init needs a model with a patch-whitening"):
        Trainer(speed_config(model="tiny_cnn", whiten_init=True), tmp_path, log=quiet)
    assert not (tmp_path / rundir.CONFIG).exists()


def test_a_time_budget_stops_at_a_step_and_the_stopped_run_is_finished(tmp_path):
    config = speed_config(time_budget_s=1e-6, val_images=64)
    metrics = Trainer(config, tmp_path, log=quiet).run()
    assert len(metrics) == 1 and metrics[0]["stopped"] == "time budget"
    assert metrics[0]["step"] == 1 and metrics[0]["test_error"] is not None
    assert saved(tmp_path)["training"]["finished"]
    again = Trainer(config, tmp_path, log=quiet).run(resume=True)
    assert comparable(again) == comparable(metrics)


def test_a_budget_that_is_not_reached_changes_nothing(tmp_path):
    plain = Trainer(speed_config(), tmp_path / "a", log=quiet).run()
    budget = Trainer(speed_config(time_budget_s=1e6), tmp_path / "b", log=quiet).run()
    assert comparable(plain) == comparable(budget)


def test_warmup_linear_and_cycled_momentum_follow_their_formulas():
    total, warmup, r = 10, 3, 0.1
    factors = [warmup_linear_factor(s, total, warmup, r) for s in range(12)]
    assert factors[:3] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    assert factors[3] == 1.0 and factors[10:] == [r, r]
    assert factors[3:10] == pytest.approx([r + (1 - r) * (1 - k / 7) for k in range(7)])
    assert cycled_momentum(1.0, r, 0.95, 0.85) == pytest.approx(0.85)
    assert cycled_momentum(r, r, 0.95, 0.85) == pytest.approx(0.95)
    assert cycled_momentum(0.0, r, 0.95, 0.85) == pytest.approx(0.95)


def test_momentum_is_cycled_against_the_learning_rate_in_the_trainer(tmp_path):
    config = speed_config(method="fp-sgd", schedule="warmup-linear", warmup_steps=2,
                          momentum=0.95, momentum_min=0.85, epochs=1)  # fmt: skip
    trainer = Trainer(config, tmp_path, log=quiet)
    seen = []
    real_step = trainer.optimizer.step

    def record():
        group = trainer.optimizer.param_groups[0]
        seen.append((group["lr"] / config.lr, group["momentum"]))
        return real_step()

    trainer.optimizer.step = record
    trainer.run()
    for factor, momentum in seen:
        assert momentum == pytest.approx(cycled_momentum(factor, 0.0, 0.95, 0.85))
    assert min(m for _, m in seen) == pytest.approx(0.85)  # at the peak of the rate


# -- qtrain speedrun ---------------------------------------------------------------------------
def test_minutes_to_a_target_reads_validation_accuracy_when_held_out():
    records = [
        {"seconds": 30.0, "val_error": 20.0, "test_error": None},
        {"seconds": 30.0, "val_error": 12.0, "test_error": None},
        {"seconds": 60.0, "val_error": 9.0, "test_error": 9.5},
    ]
    assert accuracy_curve(records) == [(0.5, 80.0), (1.0, 88.0), (2.0, 91.0)]
    assert minutes_to(records, 85) == 1.0 and minutes_to(records, 95) is None
    tests_only = [{"seconds": 60.0, "test_error": 14.0}]
    assert minutes_to(tests_only, 85) == 1.0
    assert flops_to(records, [100, 200, 300], 85) == 200
    assert flops_to(records, [100, 200, 300], 95) is None


def test_training_flops_count_forward_and_the_gradients_autograd_computes():
    # tiny_mlp on 8×8 digits: a 4×4 convolution 1 → 64 channels on the pooled 4×4 image, then
    # a linear 64 → 10. Forward 2·16·64 + 2·64·10; the backward pass computes both weight
    # gradients and the linear layer's input gradient, but not the first layer's.
    assert training_flop_per_image(RunConfig(model="tiny_mlp", dataset="digits")) == (
        2 * (2 * 16 * 64) + 3 * (2 * 64 * 10)
    )
    wide = RunConfig(model="tiny_mlp", dataset="digits", width=2.0)
    assert training_flop_per_image(wide) == 2 * (2 * 16 * 128) + 3 * (2 * 128 * 10)


def test_variants_keep_the_recipe_and_change_only_what_they_name():
    recipe = speed_config(method="bc-adam", scale="he", val_images=64, time_budget_s=30.0,
                          crop_padding=2, crop_fill="reflect", flip="alternating",
                          float_fraction=0.3)  # fmt: skip
    fp = float_variant(recipe)
    assert (fp.method, fp.scale, fp.model, fp.lr) == ("fp-adam", "none", "speednet", recipe.lr)
    assert fp.float_fraction == 0.0  # an fp method has no float phase to end (and refuses one)
    assert (fp.crop_padding, fp.crop_fill, fp.flip) == (2, "reflect", "alternating")
    paper = paper_variant(recipe, epochs=3)
    assert (paper.model, paper.width, paper.method, paper.epochs) == ("vgg9", 0.25, "bc-adam", 3)
    assert (paper.time_budget_s, paper.val_images, paper.dataset) == (30.0, 64, "synthetic")
    # the paper's recipe keeps its own crop and flip (the usual 4-pixel crop, random flips)
    assert (paper.crop_padding, paper.crop_fill, paper.flip) == (4, "zeros", "random")
    assert paper.float_fraction == 0.0  # the paper trains binary from the first step


def test_run_speedrun_writes_a_markdown_table_over_seeds(tmp_path):
    config = speed_config(epochs=1, val_images=64)
    results = run_speedrun(config, tmp_path, seeds=2, variants=("binary", "float"),
                           targets=(50.0,), log=quiet)  # fmt: skip
    assert [(r["variant"], r["seed"]) for r in results] == [
        ("binary", 0), ("binary", 1), ("float", 0), ("float", 1)
    ]  # fmt: skip
    assert all(r["accuracy_on"] == "val" and r["final_test_accuracy"] is not None
               for r in results)  # fmt: skip
    folder = tmp_path / "speedrun-full"
    table = (folder / "table.md").read_text()
    assert "| binary | speednet ×0.125 | bc-adam | 2 |" in table
    assert "| float | speednet ×0.125 | fp-adam | 2 |" in table
    assert json.loads((folder / "table.json").read_text()) == json.loads(json.dumps(results))
    per_image = training_flop_per_image(config)
    for r in results:  # 448 training images, 7 steps of 64, all trained in the one epoch
        assert r["gflop_per_image"] == per_image / 1e9
        assert r["pflop"] == 7 * 64 * per_image / 1e15
        assert r["pflop_to_50"] in (None, r["pflop"])
    assert "PFLOP to 50% |" in table
    for r in results:  # the evaluations' minutes, from the records' eval_seconds
        records = rundir.read_metrics(folder / r["variant"] / f"seed{r['seed']}")
        assert all(m["eval_seconds"] > 0 for m in records)
        assert r["eval_minutes"] == pytest.approx(sum(m["eval_seconds"] for m in records) / 60)
    row = table.splitlines()[2].split(" | ")
    assert row[-2] == "1"  # epochs trained, as a whole number
    assert row[-1].rstrip(" |") == format_cell([r["eval_minutes"] for r in results[:2]])
    # a second call reads the finished runs back instead of training them again
    again = run_speedrun(config, tmp_path, seeds=2, variants=("binary", "float"),
                         targets=(50.0,), log=quiet)  # fmt: skip
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(results))


@pytest.mark.slow
def test_runs_trained_at_once_repeat_the_numbers_of_runs_trained_in_turn(tmp_path, monkeypatch):
    config = speed_config(epochs=1, val_images=64)
    in_turn = run_speedrun(config, tmp_path / "a", seeds=2, targets=(50.0,), log=quiet)
    workers, real_run_cells = [], speedrun.run_cells

    def run_cells(*args, jobs=1, **kwargs):  # the real one, noting how many train at once
        workers.append(jobs)
        return real_run_cells(*args, jobs=jobs, **kwargs)

    monkeypatch.setattr(speedrun, "run_cells", run_cells)
    lines = []
    at_once = run_speedrun(config, tmp_path / "b", seeds=2, targets=(50.0,), jobs=3,
                           log=lines.append)  # fmt: skip
    assert workers == [2]  # jobs=3 for 2 runs: 2 at once, each with its own 1 thread
    cores = speedrun.available_cores()
    assert lines[0] == f"2 runs train at once, 1 thread each on {cores} core{'s' * (cores > 1)}"
    assert [r["final_test_accuracy"] for r in at_once] == [
        r["final_test_accuracy"] for r in in_turn
    ]
    for seed in (0, 1):
        a, b = (rundir.read_metrics(tmp_path / x / "speedrun-full" / "binary" / f"seed{seed}")
                for x in "ab")  # fmt: skip
        assert comparable(a) == comparable(b)
    lines.clear()  # finished runs are read back, not counted among those that train at once
    run_speedrun(config, tmp_path / "b", seeds=2, targets=(50.0,), jobs=2, log=lines.append)
    assert not any("at once" in line for line in lines) and workers == [2, 1]


def test_runs_at_once_take_their_share_of_the_cores_unless_threads_is_set(monkeypatch):
    monkeypatch.setattr(speedrun, "available_cores", lambda: 8)
    lines = []
    assert share_cores(speed_config(threads=0), 1, lines.append).threads == 0  # in turn
    assert share_cores(speed_config(threads=0), 3, lines.append).threads == 2  # ⌊8 / 3⌋
    assert share_cores(speed_config(threads=0), 16, lines.append).threads == 1  # at least one
    assert share_cores(speed_config(threads=4), 2, lines.append).threads == 4  # the user's own
    assert lines == [
        "3 runs train at once, 2 threads each on 8 cores",
        "16 runs train at once, 1 thread each on 8 cores",
        "2 runs train at once, 4 threads each on 8 cores",
    ]
    budgeted = speed_config(threads=0, time_budget_s=60.0)
    share_cores(budgeted, 2, lines.append)
    assert lines[-1] == (
        "2 runs train at once, 4 threads each on 8 cores; each fits its time budget to the "
        "speed it gets beside the others"
    )


def test_speedrun_command_runs_a_preset_and_names_bad_arguments(tmp_path, capsys):
    args = ["speedrun", "--model", "speednet", "--width", "0.125", "--dataset", "synthetic",
            "--epochs", "1", "--batch-size", "64", "--set", "device=cpu",
            "--set", "channels_last=false", "--set", "val_images=0", "--set", "threads=1",
            "--targets", "50", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| binary | speednet ×0.125 |" in out
    assert (tmp_path / "speedrun-full" / "table.md").is_file()
    assert main([*args[:-2], "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seeds" in err[0]
    assert main([*args[:-2], "--jobs", "0", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs" in err[0]
    assert not (tmp_path / "y").exists()


def test_bf16_on_a_cpu_without_native_support_is_named_once(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_isa, "has_native_bf16", lambda: False)
    lines = []
    Trainer(speed_config(epochs=1, amp="bf16"), tmp_path / "a", log=lines.append).run()
    assert sum("no native bf16" in line for line in lines) == 1
    lines.clear()
    Trainer(speed_config(epochs=1), tmp_path / "b", log=lines.append).run()
    assert not any("bf16" in line for line in lines)


def test_an_interrupted_speedrun_says_to_run_the_same_command_again(monkeypatch, capsys):
    from qtrain.experiments import speedrun
    from qtrain.train.trainer import TrainingInterrupted

    def interrupted(*_args, **_kwargs):
        raise TrainingInterrupted(2)

    monkeypatch.setattr(speedrun, "run_speedrun", interrupted)
    assert main(["speedrun", "--out", "unused"]) == 130
    assert capsys.readouterr().err.strip() == (
        "qtrain: interrupted; a checkpoint was saved, continue by running the same command again"
    )


def test_a_run_fitted_to_under_its_share_of_the_recipe_is_told_to_try_a_narrower_network():
    def fitted(steps: int) -> dict:
        fit = Fit(epochs=-(-steps // 175), recipe_epochs=14, budget_s=1200.0,
                  first_epoch_seconds=264.7, setup_seconds=1.2, margin=0.05, machine={},
                  steps=steps, steps_per_epoch=175)  # fmt: skip
        return {"fit": fit.to_dict()}

    wide, narrow = RunConfig(model="speednet", width=1.0), RunConfig(model="speednet", width=0.5)
    hint = narrower_hint([fitted(1358), fitted(756)], wide)  # the fewest epochs of the seeds
    assert hint.startswith("only 4.3 of the recipe's 14 epochs fit") and "--width 0.5" in hint
    assert narrower_hint([fitted(1358)], wide).startswith("only 7.8 of")  # under 65% of 14
    assert narrower_hint([fitted(1650)], wide) is None  # 9.4 of 14: at least 65%
    assert narrower_hint([fitted(756)], narrow) is None  # already the narrowest suggested
    assert narrower_hint([{"fit": None}], wide) is None  # not fitted


def test_the_epochs_cell_shows_one_value_or_a_range_of_shown_values():
    assert epochs_cell([13.98, 14]) == "14"  # both read 14 with one decimal
    assert epochs_cell([12.34, 11.77, 12.63]) == "11.8–12.6"
    assert epochs_cell([4, 4, 3]) == "3–4"


def test_the_model_cell_names_each_seeds_width_where_the_fit_chose_differently():
    def run(model: str, seed: int) -> dict:
        return {"model": model, "seed": seed}

    same = [run("speednet ×1", 0), run("speednet ×1", 1)]
    assert models_cell(same) == "speednet ×1"
    mixed = [run("speednet ×0.75", 0), run("speednet ×1", 1), run("speednet ×1", 2)]
    assert models_cell(mixed) == "speednet ×0.75 / ×1 / ×1 (seeds 0, 1, 2)"
    assert models_cell([run("vgg9 ×1", 3), run("resnet20 ×1", 4)]) == (
        "vgg9 ×1 / resnet20 ×1 (seeds 3, 4)"
    )
