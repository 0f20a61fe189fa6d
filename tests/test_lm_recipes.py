"""`qtrain reproduce lm-recipes`: equal steps per row, shared float stages, the table's sums."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from qtrain.experiments import lm_recipes
from qtrain.train import rundir


def quiet(*_args, **_kwargs):
    pass


def test_every_row_trains_the_same_total_number_of_steps(tmp_path):
    folder = tmp_path / "lm-recipes-cpu"
    cells = lm_recipes.cells(folder, "cpu", seeds=2)
    by_path = {c.path: c for c in cells}
    total = by_path["fp/seed0"].config.max_steps
    assert total == 2000
    quantized = [c for c in cells if c.config.method != "fp-adamw"]
    assert len(quantized) == 2 * (len(lm_recipes.RECIPES) - 1)
    for cell in quantized:
        stage_steps = 0
        for need in cell.needs:
            assert cells.index(by_path[need]) < cells.index(cell)  # needs come first
            if not need.startswith("fp/"):
                stage_steps += by_path[need].config.max_steps
        assert stage_steps + cell.config.max_steps == total, cell.path
        seed = cell.config.seed
        if cell.config.init_from:
            assert Path(cell.config.init_from).parent.parent == folder
            assert cell.config.init_from.endswith(f"/seed{seed}")
        if cell.path.split("/")[0].endswith("-kd"):
            assert cell.config.distill_from == str(folder / "fp" / f"seed{seed}")
        assert (cell.config.act_bits == 8) == ("-a8" in cell.path)
        assert (cell.config.grid, cell.config.policy) == ("ternary", "linear")
        assert cell.config.quant_ramp == (0.3 if cell.path.split("/")[0].endswith("-ramp30") else 0)
    short = by_path["fp90-bc-adamw/seed1"].config
    assert (short.max_steps, short.warmup_steps) == (200, 20)
    assert by_path["fp-stage90/seed1"].config.max_steps == 1800


def test_the_table_adds_the_float_stage_to_a_rows_minutes(tmp_path, monkeypatch, fake_training):
    minutes = {}

    def fake_metrics(config):
        rng = random.Random(f"{config.method}/{config.max_steps}/{config.act_bits}/{config.seed}")
        seconds = 60.0 * config.max_steps
        loss = 1.0 + rng.random()
        return [{"epoch": 1, "step": config.max_steps, "val_loss": loss, "val_bpc": loss * 1.44,
                 "seconds": seconds}]  # fmt: skip

    def write(config, run_dir, resume, log):
        metrics = fake_metrics(config)
        rundir.write_run_files(run_dir, config)
        rundir.write_metrics(run_dir, metrics)
        rundir.write_json(run_dir / rundir.SUMMARY, {})
        minutes[run_dir.relative_to(tmp_path / "lm-recipes-smoke").as_posix()] = metrics

    from qtrain.experiments import runner

    monkeypatch.setattr(runner, "train_cell", write)
    monkeypatch.setattr(lm_recipes, "model_size", lambda run_dir: 1000)
    rows = lm_recipes.run(tmp_path, "smoke", seeds=2, log=quiet)
    assert [r["slug"] for r in rows] == [r.slug for r in lm_recipes.RECIPES]
    by_slug = {r["slug"]: r for r in rows}
    fp = [minutes[f"fp/seed{s}"][0]["val_loss"] for s in range(2)]
    row = by_slug["fp90-bc-adamw-a8-kd"]
    own = [minutes[f"fp90-bc-adamw-a8-kd/seed{s}"][0] for s in range(2)]
    assert row["gap_to_fp"] == pytest.approx([own[s]["val_loss"] - fp[s] for s in range(2)])
    # 10 steps a row: 9 float (stage) + 1 ternary, one "minute" per step here
    assert row["minutes"] == pytest.approx([10.0, 10.0])
    assert by_slug["scratch-bc-adamw"]["minutes"] == pytest.approx([10.0, 10.0])
    saved = json.loads((tmp_path / "lm-recipes-smoke" / "table.json").read_text())
    assert saved["rows"] == rows
    table = (tmp_path / "lm-recipes-smoke" / "table.md").read_text()
    assert "| FP 90% → BC 10% + distillation | ternary | int8 |" in table


@pytest.mark.slow
def test_the_smoke_budget_trains_every_recipe_for_real(tmp_path):
    text = tmp_path / "input.txt"
    rng = random.Random(0)
    text.write_text("".join(rng.choice("abcdefgh \n") for _ in range(6000)))
    rows = lm_recipes.run(tmp_path, "smoke", data_dir=text, download=False, log=quiet, jobs=2)
    assert len(rows) == len(lm_recipes.RECIPES)
    assert all(r["val_loss"][0] < 3.0 for r in rows)  # ln(9) ≈ 2.2 for a uniform guess
    folder = tmp_path / "lm-recipes-smoke"
    meta = json.loads((folder / "fp90-bc-adamw-a8-kd" / "seed0" / "meta.json").read_text())
    assert meta["init_from"]["sha256"] and meta["distill_from"]["sha256"]
