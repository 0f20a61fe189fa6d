"""The paper's experiment runners: the demo's outputs, Table 1's skip/resume logic, reports."""

from __future__ import annotations

import json

import pytest

import qtrain.data as data
from qtrain.experiments import table1
from qtrain.experiments.demo import run_demo
from qtrain.experiments.methods import LABEL_ORDER, PAPER_METHODS
from qtrain.experiments.runner import Cell, run_cells
from qtrain.report.collect import report_runs
from qtrain.report.style import METHOD_ORDER
from qtrain.train import rundir
from qtrain.train.config import load_toml
from qtrain.train.trainer import Trainer


def quiet(*_args, **_kwargs):
    pass


def test_demo_writes_results_for_the_five_methods_and_a_figure(tmp_path):
    results = run_demo(tmp_path, epochs=1, seeds=2, log=quiet)
    folder = tmp_path / "demo-full"
    saved = json.loads((folder / "table.json").read_text())
    assert saved == results
    assert [r["method"] for r in saved] == LABEL_ORDER
    for r in saved:
        assert {"method", "test_error", "train_error", "epochs", "seconds"} <= r.keys()
        assert 0 <= r["test_error"] <= 100 and r["epochs"] == 1 and len(r["test_errors"]) == 2
        assert r["test_error"] == pytest.approx(sum(r["test_errors"]) / 2)
    # binary conv weights are stored with 1 bit: the quantized models are smaller
    fp, bc = saved[0], saved[1]
    assert bc["packed_bytes"] < fp["packed_bytes"] == fp["float_bytes"]
    png = (folder / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    # a second demo reads the finished runs back: the same table, nothing trained
    assert run_demo(tmp_path, epochs=1, seeds=2, log=quiet) == results
    # and one with other settings is refused before it trains, naming the setting
    with pytest.raises(ValueError, match="holds a run with epochs=1, not 2"):
        run_demo(tmp_path, epochs=2, seeds=2, log=quiet)


def test_reports_order_methods_as_the_experiments_define_them():
    assert list(METHOD_ORDER) == LABEL_ORDER


def test_big_batch_sr_adam_uses_the_papers_batch_sizes():
    labels = {m.label: m for m in PAPER_METHODS}
    big = table1.row_config("vgg9-cifar10", labels["big-batch SR-ADAM"], "paper", 0, None, False)
    small = table1.row_config("vgg9-cifar10", labels["SR-ADAM"], "paper", 0, None, False)
    assert (big.batch_size, small.batch_size, big.method) == (1024, 128, "sr-adam")
    wide = table1.row_config(
        "wrn56_2-cifar10", labels["big-batch SR-ADAM"], "paper", 0, None, False
    )
    assert wide.batch_size == 512
    assert big.epochs == 160 and big.lr == 0.01 and big.width == 1.0


@pytest.mark.parametrize("row", table1.ROWS)
def test_every_row_comes_from_its_presets_alone(row):
    """The cells of a row differ from the row's preset only in the method (and, for big-batch
    SR-ADAM, in the batch size of its own preset)."""
    preset = load_toml(row)
    for method in PAPER_METHODS:
        config = table1.row_config(row, method, "paper", 0, None, False).to_dict()
        source = load_toml(f"{row}-sr-bigbatch") if method.big_batch else preset
        assert {k: config[k] for k in source if k != "method"} == {
            k: v for k, v in source.items() if k != "method"
        }
        assert config["method"] == method.method
        assert {k: config[k] for k in ("model", "dataset")} == {
            k: preset[k] for k in ("model", "dataset")
        }


def tiny_cell(config):
    return config.replace(
        model="tiny_mlp",
        dataset="synthetic",
        epochs=2,
        train_subset=None,
        batch_size=64,
        channels_last=False,
        device="cpu",
    )


def test_a_crash_after_the_summary_keeps_the_cells_label(tmp_path, monkeypatch):
    """Killed between summary.json and anything after it, a big-batch SR-ADAM cell must still
    be reported as big-batch SR-ADAM, not merged into SR-ADAM (same method preset)."""
    big = next(m for m in PAPER_METHODS if m.big_batch)
    config = tiny_cell(table1.row_config("vgg9-cifar10", big, "short", 0, None, False))
    cell = Cell(f"vgg9-cifar10/{big.slug}/seed0", config, "vgg9 cifar10", big.label)
    real_run = Trainer.run

    def run_then_die(self, resume=False):
        real_run(self, resume=resume)
        raise KeyboardInterrupt  # the process dies right after summary.json

    monkeypatch.setattr(Trainer, "run", run_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_cells([cell], tmp_path, quiet)
    assert rundir.is_finished(tmp_path / cell.path)
    summary = report_runs([tmp_path], tmp_path / "report", log=quiet)
    assert [r["method"] for r in summary["summary"]] == ["big-batch SR-ADAM"]


def test_finished_cells_are_skipped_and_interrupted_ones_resumed(tmp_path):
    config = tiny_cell(table1.row_config("vgg9-cifar10", PAPER_METHODS[1], "short", 0, None, False))
    cell = Cell("cell", config, "r", "BC-ADAM")
    messages = []
    run_cells([cell], tmp_path, messages.append)
    (tmp_path / "cell" / rundir.SUMMARY).unlink()  # as if killed after its last checkpoint
    run_cells([cell], tmp_path, messages.append)
    run_cells([cell], tmp_path, messages.append)
    assert [m.split()[0] for m in messages if m.split()[0] in ("train", "resume", "skip")] == [
        "train",
        "resume",
        "skip",
    ]
    assert len(rundir.read_metrics(tmp_path / "cell")) == 2
    summary = report_runs([tmp_path], tmp_path / "report", log=quiet)
    assert summary["summary"][0]["method"] == "BC-ADAM"
    table = (tmp_path / "report" / "table.md").read_text()
    assert table.startswith("Test error %") and "| r |" in table and "smaller by" in table
    assert summary["model_sizes"]["r"]["packed_bytes"] < summary["model_sizes"]["r"]["float_bytes"]


def test_a_call_that_fails_before_training_leaves_no_folders_of_its_own(tmp_path):
    """A cell whose data cannot be read fails before it trains: the folders this call made
    for it go (its label.json alone is no output), a finished cell's folder stays."""
    good = Cell("good", tiny_cell(table1.row_config("vgg9-cifar10", PAPER_METHODS[1], "short",
                                                    0, None, False)), "r", "BC-ADAM")  # fmt: skip
    bad_config = good.config.replace(dataset="cifar10", data_dir=str(tmp_path / "no-data"))
    bad = Cell("bad/seed0", bad_config, "r", "BC-ADAM")
    folder = tmp_path / "runs" / "exp"
    with pytest.raises(data.DatasetNotFoundError):
        run_cells([bad], folder, quiet)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "no-data").exists()
    run_cells([good], folder, quiet)
    with pytest.raises(data.DatasetNotFoundError):
        run_cells([good, bad], folder, quiet)
    assert sorted(path.name for path in folder.iterdir()) == ["good"]
    assert rundir.is_finished(folder / "good")


def test_unknown_rows_and_budgets_are_refused():
    with pytest.raises(ValueError, match="did you mean 'resnet56-cifar10'"):
        table1.check_rows(["resnet56-cifar"])
    with pytest.raises(ValueError, match="budget"):
        table1.row_config("vgg9-cifar10", PAPER_METHODS[0], "long", 0, None, False)
