"""User errors and internal errors apart: a mistake in the input is one line and exit 2; a
bug in qtrain keeps its traceback, says how to report it, and exits 1."""

from __future__ import annotations

import pytest

from qtrain import cli
from qtrain.base.errors import UserError

TINY = ["train", "--model", "tiny_mlp", "--dataset", "synthetic", "--epochs", "1",
        "--batch-size", "64", "--set", "device=cpu"]  # fmt: skip


def failing_train(error: BaseException):
    def train(*_args, **_kwargs):
        raise error

    return train


@pytest.mark.parametrize(
    "error",
    [ValueError("a bug that happens to be a ValueError"), KeyError("missing"),
     RuntimeError("shape mismatch"), OSError(5, "Input/output error")],
    ids=["ValueError", "KeyError", "RuntimeError", "OSError-EIO"],
)  # fmt: skip
def test_an_internal_error_keeps_its_traceback_and_exits_1(error, tmp_path, monkeypatch, capsys):
    from qtrain.train import trainer

    monkeypatch.setattr(trainer, "train", failing_train(error))
    assert cli.main([*TINY, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(error).__name__ in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qtrain: internal error: this is a bug in qtrain")
    assert "report it with the traceback above" in last


def test_the_report_line_names_the_runs_meta_json_when_there_is_one(tmp_path, capsys):
    assert cli.main([*TINY, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    from qtrain.train import trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "train", failing_train(KeyError("x")))
        assert cli.main([*TINY, "--out", str(tmp_path / "run"), "--resume"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path / "run" / "meta.json") in last


def test_a_user_error_is_one_line_without_a_traceback(tmp_path, monkeypatch, capsys):
    from qtrain.train import trainer

    monkeypatch.setattr(trainer, "train", failing_train(UserError("lower {lr}", lr="lr")))
    assert cli.main([*TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "qtrain: error: lower --lr\n"


def test_a_reader_that_goes_away_is_not_an_internal_error():
    """`qtrain list keys | head -1`: the reader closes the pipe before qtrain writes; qtrain
    stops quietly with SIGPIPE's status, no traceback (the pipe is closed first, so the write
    fails every time, not only when the output outgrows the pipe's buffer)."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "qtrain", "list", "keys"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert "Traceback" not in err and "internal error" not in err
