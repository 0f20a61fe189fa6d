"""The paper's experiment runners: the demo's outputs, Table 1's skip/resume logic, reports."""

from __future__ import annotations

import json

import pytest

from qtrain.experiments import table1
from qtrain.experiments.demo import run_demo
from qtrain.experiments.methods import LABEL_ORDER, PAPER_METHODS
from qtrain.report.collect import report_runs
from qtrain.report.style import METHOD_ORDER
from qtrain.train import rundir


def quiet(*_args, **_kwargs):
    pass


def test_demo_writes_results_for_the_five_methods_and_a_figure(tmp_path):
    results = run_demo(tmp_path, epochs=1, seeds=2, log=quiet)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == results
    assert [r["method"] for r in saved] == LABEL_ORDER
    for r in saved:
        assert {"method", "test_error", "train_error", "epochs", "seconds"} <= r.keys()
        assert 0 <= r["test_error"] <= 100 and r["epochs"] == 1 and len(r["test_errors"]) == 2
        assert r["test_error"] == pytest.approx(sum(r["test_errors"]) / 2)
    # binary conv weights are stored with 1 bit: the quantized models are smaller
    fp, bc = saved[0], saved[1]
    assert bc["packed_bytes"] < fp["packed_bytes"] == fp["float_bytes"]
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_reports_order_methods_as_the_experiments_define_them():
    assert list(METHOD_ORDER) == LABEL_ORDER


def test_big_batch_sr_adam_uses_the_papers_batch_sizes():
    labels = {m.label: m for m in PAPER_METHODS}
    row = table1.ROWS["vgg9-cifar10"]
    big = table1.row_config(row, labels["big-batch SR-ADAM"], "paper", 0, None, False)
    small = table1.row_config(row, labels["SR-ADAM"], "paper", 0, None, False)
    assert (big.batch_size, small.batch_size, big.method) == (1024, 128, "sr-adam")
    assert (
        table1.row_config(
            table1.ROWS["wrn56_2-cifar10"], labels["big-batch SR-ADAM"], "paper", 0, None, False
        ).batch_size
        == 512
    )
    assert big.epochs == 160 and big.lr == 0.01 and big.width == 1.0


def test_finished_cells_are_skipped_and_interrupted_ones_resumed(tmp_path):
    config = table1.row_config(
        table1.ROWS["vgg9-cifar10"], PAPER_METHODS[1], "short", 0, None, False
    )
    config = config.replace(
        model="tiny_mlp",
        dataset="synthetic",
        epochs=2,
        schedule="constant",  # so that the one-epoch cell may be resumed to two
        train_subset=None,
        batch_size=64,
        channels_last=False,
        device="cpu",
    )
    run_dir = tmp_path / "cell"
    messages = []
    table1.run_one(
        config.replace(epochs=1), run_dir, {"row": "r", "method": "BC-ADAM"}, messages.append
    )
    (run_dir / rundir.SUMMARY).unlink()  # as if killed after its last checkpoint
    table1.run_one(config, run_dir, {"row": "r", "method": "BC-ADAM"}, messages.append)
    table1.run_one(config, run_dir, {"row": "r", "method": "BC-ADAM"}, messages.append)
    assert [m.split()[0] for m in messages if m.split()[0] in ("train", "resume", "skip")] == [
        "train",
        "resume",
        "skip",
    ]
    assert len(rundir.read_metrics(run_dir)) == 2
    summary = report_runs([tmp_path], tmp_path / "report", log=quiet)
    assert summary["summary"][0]["method"] == "BC-ADAM"
    table = (tmp_path / "report" / "table.md").read_text()
    assert "| r |" in table and "smaller by" in table
    assert summary["model_sizes"]["r"]["packed_bytes"] < summary["model_sizes"]["r"]["float_bytes"]


def test_unknown_rows_and_budgets_are_refused():
    with pytest.raises(ValueError, match="did you mean 'resnet56-cifar10'"):
        table1.check_rows(["resnet56-cifar"])
    with pytest.raises(ValueError, match="budget"):
        table1.row_config(table1.ROWS["vgg9-cifar10"], PAPER_METHODS[0], "long", 0, None, False)
