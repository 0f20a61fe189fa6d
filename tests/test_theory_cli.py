"""`qtrain theory convex|markov` through a throwaway parser, as the main CLI will call it."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from qtrain.theory.cli import add_parser


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qtrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_convex_writes_json_and_figure(tmp_path):
    argv = ["theory", "convex", "--quick", "--steps", "64", "--seeds", "8", "--dims", "3"]
    assert _run([*argv, "--deltas", "0.1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convex.json").read_text())
    assert result["config"]["steps"] == 64 and result["config"]["dims"] == [3]
    # 2 problems × (4 methods under one rule + 2 under the other + 3 Bop settings), one Δ
    assert len(result["records"]) == 18 and len(result["floors"]) == 18
    bop = [r for r in result["records"] if r["method"] == "bop"]
    assert sorted({(r["gamma"], r["tau"]) for r in bop}) == sorted(
        tuple(gt) for gt in result["config"]["bop"]
    )
    assert result["provenance"]["version"]
    with Image.open(tmp_path / "convex.png") as image:
        assert image.format == "PNG" and image.size[0] > 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convex.json", "convex.png"]


def test_markov_writes_json_and_figure(tmp_path):
    argv = ["theory", "markov", "--alphas", "0.1", "0.01", "--chains", "64", "--horizon", "1"]
    assert _run([*argv, "--bop-steps", "20", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "markov.json").read_text())
    bop = result["bop"]
    assert bop["config"]["steps"] == 20
    assert [s["gamma"] for s in bop["problems"]["2d"]["simulated"]] == [1.0, 0.01, 1e-4]
    assert "sign_exact" in bop["problems"]["1d"] and "sign_exact" not in bop["problems"]["2d"]
    one = result["problems"]["1d"]
    assert [r["alpha"] for r in one["rows"]] == [0.1, 0.01]
    assert sum(one["limit"]["pi"]) == pytest.approx(1.0)
    with Image.open(tmp_path / "markov.png") as image:
        assert image.format == "PNG"


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("x")
    assert _run(["theory", "markov", "--quick", "--out", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("option", [["--steps", "0"], ["--deltas", "-0.1"], ["--seeds", "two"]])
def test_impossible_values_are_usage_errors(option, capsys):
    with pytest.raises(SystemExit) as stop:
        _run(["theory", "convex", *option])
    assert stop.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_missing_optional_dependency_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a)
    )
    assert _run(["theory", "markov", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "scipy is not installed" in err and "qtrain[theory]" in err
    assert not any((tmp_path / "out").glob("*"))
