"""`qtrain reproduce lm` end to end on a tiny budget and a generated text."""

from __future__ import annotations

import torch

from qtrain.experiments import lm


def test_every_cell_trains_and_the_report_holds_table_curves_and_samples(tmp_path):
    """The smoke budget, as the tests and a first-time user run it."""
    data = tmp_path / "data"
    data.mkdir()
    picks = torch.randint(20, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    (data / "input.txt").write_text("".join("abcdefghijklmnop ,.\n"[i] for i in picks))
    out = tmp_path / "out"
    folder = out / "lm-smoke"
    logs = []
    rows = lm.run(out, budget="smoke", data_dir=data, download=False, log=lambda *a, **k: None)
    assert [r["cell"] for r in rows] == [c.name for c in lm.ROWS]
    fp = next(r for r in rows if r["cell"] == "FP-ADAMW")
    ternary = next(r for r in rows if r["cell"] == "BC-ADAMW ternary")
    assert ternary["bytes"] < fp["bytes"]  # packed 2-bit projections
    table = (folder / "table.md").read_text()
    assert table.count("\n| ") == len(lm.ROWS) + 1 and "val bits / char" in table
    samples = (folder / "samples.md").read_text()
    assert samples.count("## ") == len(lm.ROWS)
    assert (folder / "curves.png").stat().st_size > 0
    lm.run(out, budget="smoke", data_dir=data, download=False, log=lambda *a, **k: logs.append(a))
    assert sum("skip" in str(a[0]) for a in logs) == len(lm.ROWS)  # finished runs are reused
