"""A run's identity is fixed at creation: a resume may change how it runs, never what it is."""

from __future__ import annotations

import json
import sys
from dataclasses import fields

import pytest

from qtrain import data as qdata
from qtrain.cli import main
from qtrain.train import rundir
from qtrain.train.config import RunConfig, identity_change, identity_keys

TRAIN = [
    *("train", "--model", "tiny_mlp", "--dataset", "synthetic", "--epochs", "1"),
    *("--batch-size", "64", "--set", "device=cpu", "--set", "channels_last=false"),
]


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def trained(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli([*TRAIN, "--lr", "0.01", "--out", run_dir], capsys)[0] == 0
    return run_dir


def test_resume_with_another_lr_is_refused_in_one_line_and_leaves_the_run_alone(trained, capsys):
    before = {name: (trained / name).read_bytes() for name in (rundir.CONFIG, rundir.META)}
    code, out, err = run_cli([*TRAIN, "--lr", "0.5", "--out", trained, "--resume"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert "trained with lr=0.01, not 0.5" in lines[0]
    assert {name: (trained / name).read_bytes() for name in before} == before


def test_a_resume_is_appended_to_meta_and_never_rewrites_the_config(trained, capsys, monkeypatch):
    config = (trained / rundir.CONFIG).read_bytes()
    created = json.loads((trained / rundir.META).read_text())
    # eval_batch_size and threads only change how the run is computed: they may change.
    changed = [*TRAIN, "--set", "eval_batch_size=32", "--set", "threads=1"]
    argv = [*changed, "--lr", "0.01", "--out", str(trained), "--resume"]
    monkeypatch.setattr(sys, "argv", ["qtrain", *argv])  # the command line meta.json records
    for _ in range(2):
        assert run_cli(argv, capsys)[0] == 0
    assert (trained / rundir.CONFIG).read_bytes() == config
    meta = json.loads((trained / rundir.META).read_text())
    assert {k: v for k, v in meta.items() if k != "resumes"} == created
    assert len(meta["resumes"]) == 2
    for entry in meta["resumes"]:
        assert {"time", "command", "git_revision"} <= set(entry)
        assert "--resume" in entry["command"] and "eval_batch_size=32" in entry["command"]


def test_every_field_is_classified_and_the_identity_holds_what_changes_the_numbers():
    keys = set(identity_keys())
    defining = {
        *("model", "width", "dataset", "method", "grid", "delta", "policy", "batch_size"),
        *("lr", "schedule", "weight_decay", "momentum", "bc_stochastic", "train_subset"),
        *("augment", "seed", "epochs", "amp", "scale", "activations"),
        "norm_after_pool",  # speednet's order of BatchNorm and the pool: its batch statistics
        *("crop_padding", "crop_fill", "flip"),  # which pixels a training step sees
        *("bop_gamma", "bop_tau", "bop_sigma"),
        *("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "tie_weights"),
        *("beta2", "max_steps", "warmup_steps", "min_lr", "grad_clip", "eval_every"),
        "optimizer_impl",  # the same formula rounded differently in the last bit
        "sr_uniforms",  # another stream of uniforms, another sequence of roundings
        "float_fraction",  # which steps train float weights
        "quant_ramp",  # which steps train blended weights
        *("momentum_min", "label_smoothing", "ema_decay", "whiten_init", "tta", "val_images"),
        *("tta_each_epoch", "resize_min_side", "resize_until", "ema_horizon"),
        "fit_to_budget",  # the schedule is drawn over the epochs it chooses
        "refit_to_budget",  # and redrawn at later epochs
        "fit_width",  # the model is built at the width it chooses
        *("act_bits", "act_norm"),
        # a start and a teacher: whether they are set; what they hold by their SHA-256
        *("init", "init_from", "distill_from", "distill_temperature", "distill_weight"),
    }
    changeable = {
        *("device", "threads", "eval_batch_size", "data_dir", "download", "compile"),
        *("channels_last", "checkpoint_every_steps", "log"),
        "fused_quant",  # the same numbers, compiled into one loop or not
        "im2col_grad",  # as with compile and threads: the same sums in another order
        *("text_file", "eval_batches"),  # the text itself is checked on resume
        "hf_path",  # the folder may move; the config and tokenizer it holds are checked
        "time_budget_s",  # a run stopped by its budget is finished; a crashed one may get more
        "flip_every",  # the same weights; only which steps the flip_rate record counts
    }
    assert keys == defining
    assert {f.name for f in fields(RunConfig)} == defining | changeable


@pytest.mark.parametrize(
    ("key", "saved", "new"),
    [("momentum", 0.9, 0.0), ("augment", None, True), ("amp", "auto", "bf16"), ("seed", 0, 1)],
)
def test_a_change_of_an_identity_key_is_named_with_both_values(key, saved, new):
    config = RunConfig(model="tiny_mlp", dataset="synthetic")
    assert identity_change(config.replace(**{key: saved}).to_dict(), config) in (
        None,  # when `saved` is the default
        (key, saved, getattr(config, key)),
    )
    assert identity_change(config.replace(**{key: saved}).to_dict(), config.replace(**{key: new}))[
        :1
    ] == (key,)
    assert identity_change(config.to_dict(), config.replace(device="cpu", threads=3)) is None


def test_epochs_define_the_run_only_when_the_schedule_depends_on_them():
    step = RunConfig(schedule="step", epochs=2)
    assert identity_change(step.to_dict(), step.replace(epochs=3)) == ("epochs", 2, 3)
    constant = RunConfig(schedule="constant", epochs=2)
    assert identity_change(constant.to_dict(), constant.replace(epochs=3)) is None


def test_a_key_missing_from_an_older_run_counts_as_its_default():
    config = RunConfig()
    saved = {k: v for k, v in config.to_dict().items() if k not in ("scale", "activations")}
    assert identity_change(saved, config) is None
    assert identity_change(saved, config.replace(scale="channel"))[:2] == ("scale", "none")


def test_a_changed_setting_is_named_before_any_data_is_read(trained, capsys, monkeypatch):
    def load_called(*args, **kwargs):
        pytest.fail("the data set was read before the resume was checked")

    monkeypatch.setattr(qdata, "load", load_called)
    code, _, err = run_cli([*TRAIN, "--lr", "0.5", "--out", trained, "--resume"], capsys)
    assert code == 2 and "trained with lr=0.01, not 0.5" in err
