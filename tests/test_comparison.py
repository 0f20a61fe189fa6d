"""`qtrain reproduce methods`: its cells, skip/resume logic and the table, on fake training."""

from __future__ import annotations

import json
import statistics

import pytest
from fake_training import fake_metrics, write_fake_run

from qtrain import cli
from qtrain.experiments import comparison
from qtrain.train.config import from_dict


def quiet(*_args, **_kwargs):
    pass


def test_cells_cover_every_method_and_binary_activations_where_it_makes_sense():
    float_cells = [c for c in comparison.COLUMNS if c.activations == "float"]
    binary_cells = [c for c in comparison.COLUMNS if c.activations == "binary"]
    assert [(c.method, c.scale) for c in float_cells] == [
        ("fp-adam", "none"),
        ("bc-adam", "none"),
        ("bc-adam", "he"),
        ("bc-adam", "absmean"),
        ("sr-adam", "none"),
        ("r-adam", "none"),
        ("bop-adam", "none"),
        ("bop2-adam", "none"),
    ]
    assert [c.label for c in binary_cells] == ["BC-ADAM", "BC-ADAM + absmean", "Bop", "Bop2"]
    assert len({c.slug for c in comparison.COLUMNS}) == len(comparison.COLUMNS) == 12


def test_cell_config_is_the_budget_and_the_cell_and_nothing_tuned():
    cell = comparison.Column("Bop", "bop-adam", activations="binary")
    config = comparison.cell_config(cell, "cpu", 1, "/data", False)
    assert config["method"] == "bop-adam" and config["activations"] == "binary"
    assert config["scale"] == "none" and config["seed"] == 1 and config["data_dir"] == "/data"
    assert (config["model"], config["dataset"], config["grid"]) == ("vgg9", "cifar10", "binary")
    assert (config["lr"], config["batch_size"]) == (0.01, 128)
    assert not any(k.startswith("bop_") for k in config)  # the presets' own defaults apply
    budget = comparison.BUDGETS["cpu"].settings
    assert config["width"] == budget["width"] and config["epochs"] == budget["epochs"]
    paper = comparison.cell_config(cell, "paper", 0)
    assert paper["width"] == 1.0 and paper["train_subset"] is None and paper["epochs"] >= 160


def test_unknown_budget_and_bad_seeds_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match="unknown methods budget 'short'; choose one of cpu, paper"
    ):
        comparison.run(tmp_path, budget="short", log=quiet)
    with pytest.raises(ValueError, match="seeds must be a whole number >= 1"):
        comparison.run(tmp_path, seeds=0, log=quiet)


def test_run_trains_every_cell_and_seed_then_writes_the_table(tmp_path, fake_training):
    rows = comparison.run(tmp_path, budget="cpu", seeds=2, log=quiet)
    trained = {(c.method, c.scale, c.activations, c.seed) for c, _ in fake_training}
    expected = {(c.method, c.scale, c.activations, s) for c in comparison.COLUMNS for s in range(2)}
    assert trained == expected and len(fake_training) == 24
    assert not any(resume for _, resume in fake_training)
    folder = tmp_path / "methods-cpu"
    table = (folder / "table.md").read_text()
    for cell in comparison.COLUMNS:
        runs = [fake_metrics(from_dict(comparison.cell_config(cell, "cpu", s))) for s in range(2)]
        errors = [r[-1]["test_error"] for r in runs]
        mean, std = statistics.fmean(errors), statistics.stdev(errors)
        minutes = [sum(m["seconds"] for m in r) / 60 for r in runs]
        flips = statistics.fmean(
            statistics.fmean(m["flip_rate"] for m in r) * r[0]["step"] for r in runs
        )
        line = next(
            row
            for row in table.splitlines()
            if row.startswith(f"| {cell.label} | {cell.activations} |")
        )
        assert f"{mean:.2f} ± {std:.2f}" in line
        assert f"{statistics.fmean(minutes):.2f}" in line and f"{flips:.3g}" in line
    assert len(rows) == 12 and all(r["seeds"] == 2 for r in rows)
    saved = json.loads((folder / "table.json").read_text())
    assert len(saved["runs"]) == 24
    assert (folder / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_finished_cells_are_skipped_and_interrupted_ones_resumed(tmp_path, fake_training):
    first = comparison.COLUMNS[1]
    interrupted = from_dict(comparison.cell_config(first, "cpu", 0))
    write_fake_run(interrupted, tmp_path / "methods-cpu" / first.slug / "seed0", finished=False)
    messages: list[str] = []
    comparison.run(tmp_path, seeds=1, log=lambda *a, **_k: messages.append(str(a[0])))
    assert [resume for c, resume in fake_training if c == interrupted] == [True]
    assert sum(resume for _, resume in fake_training) == 1
    fake_training.clear()
    messages.clear()
    comparison.run(tmp_path, seeds=1, log=lambda *a, **_k: messages.append(str(a[0])))
    assert fake_training == []
    assert sum(m.startswith("skip ") for m in messages) == 12


def test_a_finished_run_with_other_settings_is_not_reused(tmp_path, fake_training):
    cell = comparison.COLUMNS[0]
    other = from_dict(comparison.cell_config(cell, "cpu", 0) | {"epochs": 1})
    write_fake_run(other, tmp_path / "methods-cpu" / cell.slug / "seed0")
    with pytest.raises(ValueError, match=r"holds a run with epochs=1, not 6"):
        comparison.run(tmp_path, seeds=1, log=quiet)
    assert fake_training == []  # refused before any cell trained


def test_cli_runs_the_comparison_with_its_own_default_budget(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(comparison, "run", lambda out, **kwargs: seen.update(kwargs, out=out))
    assert cli.main(["reproduce", "methods", "--out", str(tmp_path), "--no-download"]) == 0
    assert seen["budget"] == "cpu" and seen["seeds"] is None and seen["download"] is False
    assert seen["out"] == tmp_path


def test_every_method_of_the_comparison_has_its_own_colour():
    from qtrain.report.style import colour

    labels = list(dict.fromkeys(c.label for c in comparison.COLUMNS))
    colours = [colour(label, i) for i, label in enumerate(labels)]
    assert len(set(colours)) == len(labels)
