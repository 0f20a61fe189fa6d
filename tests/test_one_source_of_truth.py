"""Every number a table prints belongs to the runs it names: one experiment runner, one budget
schema, config keys that say once what they are (docs/errors.md, "Experiments")."""

from __future__ import annotations

import json

import pytest
import torch
from fake_training import fake_metrics, write_fake_run

from qtrain import cli
from qtrain.experiments import comparison, fig7, lm, runner, speedrun, table1
from qtrain.experiments.demo import BUDGETS as DEMO_BUDGETS
from qtrain.train import config as qconfig
from qtrain.train.config import ConfigError, RunConfig, from_dict
from qtrain.train.parts import make_optimizer
from qtrain.train.preflight import check_config


def quiet(*_args, **_kwargs):
    pass


def vgg9_table(folder) -> dict[str, float]:
    """{method: test error} of the vgg9 row of a table1 table.json."""
    summary = json.loads((folder / "table.json").read_text())["runs"]
    return {r["method"]: r["test_error"] for r in summary}


# -- one experiment folder per budget; results of this invocation only --------------------------
def test_a_table_of_one_budget_is_never_printed_as_another(tmp_path, fake_training):
    short = table1.run(tmp_path, rows=["vgg9-cifar10"], budget="short", log=quiet)
    paper = table1.run(tmp_path, rows=["vgg9-cifar10"], budget="paper", log=quiet)
    assert len(fake_training) == 10  # the paper budget trained its own five cells
    assert [c.epochs for c, _ in fake_training] == [12] * 5 + [160] * 5
    for budget, summary in (("short", short), ("paper", paper)):
        cells = table1.cells(["vgg9-cifar10"], budget, 1)
        expected = {c.method: fake_metrics(c.config)[-1]["test_error"] for c in cells}
        assert vgg9_table(tmp_path / f"table1-{budget}") == expected
        assert {r["method"]: r["test_error"] for r in summary["runs"]} == expected
    assert vgg9_table(tmp_path / "table1-short") != vgg9_table(tmp_path / "table1-paper")


def test_figure_7_of_one_budget_is_never_drawn_from_another(tmp_path, fake_training):
    short = fig7.run(tmp_path, budget="short", log=quiet)
    paper = fig7.run(tmp_path, budget="paper", log=quiet)
    assert len(fake_training) == 4
    assert [m[0][-1]["epoch"] for m in short.values()] == [12, 12]
    assert [m[0][-1]["epoch"] for m in paper.values()] == [160, 160]
    assert (tmp_path / "fig7-short" / "fig7.png").is_file()


def test_fewer_seeds_after_more_report_only_the_seeds_asked_for(tmp_path, fake_training):
    rows = comparison.run(tmp_path, budget="cpu", seeds=3, log=quiet)
    assert {r["seeds"] for r in rows} == {3}
    fake_training.clear()
    rows = comparison.run(tmp_path, budget="cpu", seeds=1, log=quiet)
    assert fake_training == []  # seed 0 of every column is reused
    assert {r["seeds"] for r in rows} == {1}
    saved = json.loads((tmp_path / "methods-cpu" / "table.json").read_text())
    assert {r["seed"] for r in saved["runs"]} == {0}
    summary = table1.run(tmp_path, rows=["vgg9-cifar10"], seeds=2, log=quiet)
    assert {r["seed"] for r in summary["runs"]} == {0, 1}
    summary = table1.run(tmp_path, rows=["vgg9-cifar10"], seeds=1, log=quiet)
    assert {r["seed"] for r in summary["runs"]} == {0}


def test_experiments_sharing_an_output_folder_keep_their_own_tables(tmp_path, fake_training):
    table1.run(tmp_path, rows=["vgg9-cifar10"], log=quiet)
    comparison.run(tmp_path, seeds=1, log=quiet)
    assert "| vgg9 cifar10 |" in (tmp_path / "table1-short" / "table.md").read_text()
    assert "flips / weight / epoch" in (tmp_path / "methods-cpu" / "table.md").read_text()
    assert not (tmp_path / "table.md").exists()


def test_a_folder_holding_another_run_is_refused_before_anything_trains(tmp_path, fake_training):
    cells = table1.cells(["vgg9-cifar10"], "short", 1)
    last = cells[-1]
    write_fake_run(last.config.replace(lr=0.1), tmp_path / "table1-short" / last.path)
    with pytest.raises(ConfigError, match=r"holds a run with lr=0\.1, not 0\.01"):
        table1.run(tmp_path, rows=["vgg9-cifar10"], log=quiet)
    assert fake_training == []


def test_a_finished_run_is_not_taken_for_a_longer_or_otherwise_budgeted_one(tmp_path):
    """Keys that are not identity for a resume (a constant schedule's epochs, a time budget)
    still tell a finished run from the cell an experiment asks for."""
    constant = RunConfig(model="tiny_mlp", dataset="synthetic", schedule="constant", epochs=1)
    write_fake_run(constant, tmp_path / "c")
    for other in (constant.replace(epochs=2), constant.replace(time_budget_s=60.0)):
        with pytest.raises(ConfigError, match="holds a run with"):
            runner.check_cells([runner.Cell("c", other, "r", "m")], tmp_path)
    runner.check_cells([runner.Cell("c", constant.replace(threads=2), "r", "m")], tmp_path)


def test_a_speedrun_with_another_time_budget_is_refused(tmp_path, fake_training):
    recipe = RunConfig(model="speednet", dataset="synthetic", epochs=1, time_budget_s=60.0)
    speedrun.run_speedrun(recipe, tmp_path, log=quiet)
    with pytest.raises(ConfigError, match="time_budget_s=60.0, not 120.0"):
        speedrun.run_speedrun(recipe.replace(time_budget_s=120.0), tmp_path, log=quiet)


def test_every_experiment_has_a_smoke_budget_of_one_schema():
    for budgets in (table1.BUDGETS, comparison.BUDGETS, lm.BUDGETS, speedrun.BUDGETS,
                    DEMO_BUDGETS):  # fmt: skip
        assert "smoke" in budgets
        for budget in budgets.values():
            assert isinstance(budget, runner.Budget) and budget.seeds >= 1
            for key in budget.settings:
                qconfig.key_spec(key)  # every setting is a config key


@pytest.mark.slow
def test_the_smoke_budget_runs_end_to_end_and_a_second_call_trains_nothing(tmp_path, capsys):
    """`qtrain reproduce fig7 --budget smoke` trains in seconds on synthetic images; the same
    command again reads its runs back."""
    args = ["reproduce", "fig7", "--budget", "smoke", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("\ntrain ") + first.startswith("train ") == 2
    assert cli.main(args) == 0
    again = capsys.readouterr().out
    assert again.count("skip ") == 2 and "train " not in again
    assert again.splitlines()[-3:] == first.splitlines()[-3:]  # the same numbers


# -- config keys: identity, scope and where they travel ------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        ({"dataset": "shakespeare-char", "model": "gpt", "augment": True},
         "augment applies to image data sets, not to data set 'shakespeare-char'"),
        ({"method": "bc-sgd", "beta2": 0.99}, "beta2 applies to Adam and AdamW methods"),
        ({"schedule": "step", "min_lr": 0.001}, "min_lr applies to the per-step schedules"),
        ({"schedule": "cosine", "warmup_steps": 10}, "warmup_steps applies to the per-step"),
        ({"method": "bc-adam", "bop_gamma": 1e-3}, "bop_gamma applies to bop-adam and bop2-adam"),
        ({"method": "sr-adam", "bc_stochastic": True}, "bc_stochastic applies to BinaryConnect"),
        ({"dataset": "synthetic", "eval_batches": 5}, "eval_batches applies to text data sets"),
        ({"dataset": "synthetic", "n_layer": 2}, "n_layer applies to text models"),
    ],
)  # fmt: skip
def test_a_key_that_does_not_apply_to_the_run_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_config(RunConfig(**{"model": "tiny_cnn", "dataset": "synthetic", **changes}))


def test_a_float_run_accepts_quantization_keys_that_do_not_change_it():
    """A preset switches its method from the command line, so fp-* takes grid and policy; a
    float run computes the same numbers whatever they say, so they are not its identity."""
    fp = RunConfig(model="tiny_cnn", dataset="synthetic", method="fp-adam")
    check_config(fp.replace(grid="ternary", policy="all"))
    assert qconfig.identity_change(fp.to_dict(), fp.replace(grid="ternary")) is None
    bc = fp.replace(method="bc-adam")
    assert qconfig.identity_change(bc.to_dict(), bc.replace(grid="ternary"))[0] == "grid"


def test_momentum_is_sgds_momentum_and_adams_beta1():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    adam = make_optimizer(RunConfig(method="bc-adam", momentum=0.8, beta2=0.95), model)
    assert {g["betas"] for g in adam.param_groups} == {(0.8, 0.95)}
    sgd = make_optimizer(RunConfig(method="bc-sgd", momentum=0.7), model)
    assert {g["momentum"] for g in sgd.param_groups} == {0.7}


def test_every_key_is_declared_once_with_a_section_kind_and_help():
    names = qconfig.keys()
    assert set(names) == set(RunConfig().to_dict())
    assert {qconfig.key_spec(n).section for n in names} == set(qconfig.SECTIONS)
    assert all(qconfig.key_spec(n).doc for n in names)
    machine = set(qconfig.keys(kind=qconfig.MACHINE))
    assert {"device", "threads", "data_dir", "channels_last"} <= machine
    assert "amp" in qconfig.identity_keys() and "amp" not in machine
    listing = qconfig.describe_keys()
    assert all(f"  {n} = " in listing for n in names)


def test_config_toml_is_flat_with_its_sections_as_comments(tmp_path):
    config = from_dict({"model": "gpt", "dataset": "shakespeare-char", "n_layer": 2})
    text = qconfig.to_toml(config)
    assert "# text model\nn_layer = 2" in text and "[" not in text
    (tmp_path / "c.toml").write_text(text)
    assert from_dict(qconfig.load_toml(tmp_path / "c.toml")) == config


def test_library_errors_name_settings_and_the_cli_names_flags(tmp_path, capsys):
    from qtrain.train.trainer import train

    config = RunConfig(model="tiny_mlp", dataset="synthetic", epochs=1, device="cpu")
    train(config, tmp_path / "run", log=quiet)
    with pytest.raises(ValueError) as library:
        train(config, tmp_path / "run", log=quiet)
    assert "resume=True" in str(library.value) and "--" not in str(library.value)
    args = ["train", "--model", "tiny_mlp", "--dataset", "synthetic", "--epochs", "1",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(args) == 2
    assert "continue it with --resume or choose another --out folder" in capsys.readouterr().err


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
def test_eval_of_a_run_folder_computes_in_the_runs_memory_layout(tmp_path, monkeypatch,
                                                                 channels_last):  # fmt: skip
    """`qtrain eval` runs the convolutions the run evaluated with: a channels-last run's model
    and images channels-last (for speednet 1.4× faster than contiguous under the AVX2
    stand-in, 1.55× with native AVX-512 BF16)."""
    import qtrain.evaluate as evaluate_module
    from qtrain.train.trainer import train

    config = RunConfig(model="tiny_cnn", dataset="synthetic", epochs=1, batch_size=64,
                       device="cpu", channels_last=channels_last, threads=1)  # fmt: skip
    train(config, tmp_path / "run", log=quiet)
    seen = {}

    def spy(model, loader, *args, **kwargs):
        x, _ = next(iter(loader.epoch(0)))
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        seen["layouts"] = {tensor.is_contiguous(memory_format=torch.channels_last)
                           for tensor in (x, conv.weight)}  # fmt: skip
        return {"loss": 0.0, "error": 0.0}

    monkeypatch.setattr(evaluate_module, "evaluate", spy)
    evaluate_module.evaluate_file(tmp_path / "run")
    assert seen["layouts"] == {channels_last}


# -- a packed file is evaluated as its run was ---------------------------------------------------
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels-last", "contiguous"])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_eval_of_a_packed_file_equals_eval_of_its_run_folder(tmp_path, amp, channels_last):
    """The packed file carries every identity key, amp included, so `qtrain eval` of it
    computes at the run's precision. A run folder is evaluated in its run's memory layout,
    so its loss is the last record's to the bit; a packed file, which carries no machine
    setting, in the default channels-last layout: to the bit for a run in that layout, to
    float rounding (other convolution kernels) for a contiguous one."""
    from qtrain.evaluate import evaluate_file
    from qtrain.export.packed import read_packed, save_packed
    from qtrain.train.checkpoint import load_checkpoint
    from qtrain.train.trainer import train

    config = RunConfig(model="tiny_cnn", dataset="synthetic", epochs=1, batch_size=64,
                       amp=amp, device="cpu", channels_last=channels_last, threads=1)  # fmt: skip
    last = train(config, tmp_path / "run", log=quiet)[-1]
    save_packed(tmp_path / "m.safetensors", load_checkpoint(tmp_path / "run" / "checkpoint.pt"))
    assert read_packed(tmp_path / "m.safetensors")[1]["config"]["amp"] == amp
    run, packed = evaluate_file(tmp_path / "run"), evaluate_file(tmp_path / "m.safetensors")
    assert (run["test_loss"], run["test_error"]) == (last["test_loss"], last["test_error"])
    if channels_last:
        assert (packed["test_loss"], packed["test_error"]) == (run["test_loss"], run["test_error"])
    else:
        assert packed["test_loss"] == pytest.approx(run["test_loss"], rel=1e-4)
    if amp == "bf16":  # the same model in float32 gives another loss: precision is identity
        from qtrain.evaluate import eval_loader
        from qtrain.export.loading import load_any_model
        from qtrain.train.evaluation import evaluate

        model, record = load_any_model(tmp_path / "m.safetensors")
        loader, _ = eval_loader(record)
        assert evaluate(model, loader, torch.device("cpu"), "off")["loss"] != run["test_loss"]
