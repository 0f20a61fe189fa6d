"""The command line: the happy path end to end, and one clear line for each user error."""

from __future__ import annotations

import json

import pytest

from qtrain.cli import main

TRAIN = [
    "train",
    "--model",
    "tiny_mlp",
    "--dataset",
    "synthetic",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--set",
    "device=cpu",
    "--set",
    "channels_last=false",
]


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_commands_name_the_registered_entries(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0 and "bc-adam" in out and "r-sgd" in out
    code, out, _ = run_cli(["list", "models"], capsys)
    assert code == 0 and all(m in out for m in ("vgg9", "vgg_bc", "resnet56", "wrn56_2"))
    code, out, _ = run_cli(["list", "datasets"], capsys)
    assert code == 0 and "cifar10" in out and "digits" in out


def test_train_eval_and_report_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli([*TRAIN, "--method", "bc-adam", "--out", run], capsys)
    assert code == 0 and "finished: test error" in out
    code, out, _ = run_cli(["eval", run, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["method"] == "bc-adam" and 0 <= result["test_error"] <= 100
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["test_error"] == pytest.approx(last["test_error"])
    code, out, _ = run_cli(["report", tmp_path, "--out", tmp_path / "report"], capsys)
    assert code == 0 and (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert "BC-ADAM" in (tmp_path / "report" / "table.md").read_text()


def test_resume_extends_a_finished_run_with_a_constant_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    constant = [*TRAIN, "--set", "schedule=constant"]
    assert run_cli([*constant, "--out", run], capsys)[0] == 0
    args = [a if a != "2" else "3" for a in constant]
    code, _, _ = run_cli([*args, "--out", run, "--resume"], capsys)
    assert code == 0 and len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "vgg99", "--dataset", "synthetic"], "did you mean"),
        (["train", "--method", "bc-adamm", "--dataset", "synthetic"], "did you mean 'bc-adam'"),
        (["train", "--dataset", "cifar11"], "did you mean 'cifar10'"),
        (["train", "--set", "learning_rate=0.1"], "unknown config key 'learning_rate'"),
        (["train", "--set", "epochs=ten"], "epochs"),
        (["train", "--set", "epochs=-3"], "epochs must be"),
        (["train", "--lr", "0"], "lr must be"),
        (["train", "--set", "schedule=linear"], "schedule must be"),
        (["train", "--config", "/nonexistent/preset.toml"], "does not exist"),
        (["eval", "/nonexistent/checkpoint.pt"], "does not exist"),
        (["report", "/nonexistent/runs"], "does not exist"),
        (["reproduce", "table1", "--rows", "vgg10-cifar10"], "did you mean 'vgg9-cifar10'"),
    ],
)
def test_user_errors_end_with_one_clear_line(args, message, capsys, tmp_path):
    code, out, err = run_cli(
        [*args, "--out", tmp_path / "o"] if args[0] in ("train", "report", "reproduce") else args,
        capsys,
    )
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    code, _, err = run_cli(["eval", bogus], capsys)
    assert code == 2 and "neither a qtrain checkpoint nor a packed model" in err


def test_a_bad_config_file_is_refused(tmp_path, capsys):
    preset = tmp_path / "preset.toml"
    preset.write_text('model = "tiny_mlp"\nepochs = "many"\n')
    code, _, err = run_cli(["train", "--config", preset, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "'epochs' needs a value of type int" in err
    preset.write_text("model = [unclosed\n")
    code, _, err = run_cli(["train", "--config", preset, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "not valid TOML" in err


def test_a_text_model_named_alone_gets_its_data_set_and_the_linear_policy():
    """`--model gpt` (or hf) without --dataset or policy: tiny Shakespeare and BitNet's policy,
    where the image defaults would be refused (cifar10) or quantize nothing (conv)."""
    from qtrain.cli import _resolve_config, build_parser

    parser = build_parser()
    config = _resolve_config(parser.parse_args(["train", "--model", "gpt", "--method", "bc-adamw"]))
    assert (config.dataset, config.policy) == ("shakespeare-char", "linear")
    chosen = ["train", "--model", "gpt", "--dataset", "shakespeare-char", "--set", "policy=all"]
    assert _resolve_config(parser.parse_args(chosen)).policy == "all"
    image = _resolve_config(parser.parse_args(["train", "--model", "vgg9"]))
    assert (image.dataset, image.policy) == ("cifar10", "conv")
