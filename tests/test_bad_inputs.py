"""The bad-input catalogue: every input a user can get wrong ends in one clear line.

Each case runs the real command line in-process in a folder of its own and must end with
exit code 2, exactly one line on stderr (`qtrain: error: ...`) that names the problem, nothing
on stdout, no traceback, and no partial output: the folder's files, sizes and modification
times are the same after the command as before. docs/errors.md lists the same cases.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_cifar import PER_FILE, fake_batch, write_fake_cifar, write_pickle

from qtrain.base import io as atomic_io
from qtrain.cli import main
from qtrain.data import cifar as cifar_module
from qtrain.data.cifar import CIFAR10
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint

TINY = "--model tiny_mlp --epochs 1 --batch-size 64 --set device=cpu"
SYNTHETIC = f"train {TINY} --dataset synthetic"
CIFAR = f"train {TINY} --dataset cifar10 --data-dir data --no-download"
TINY_GPT = (
    "--set n_layer=1 --set n_head=2 --set n_embd=16 --set block_size=8 --batch-size 4 "
    "--set max_steps=2 --set eval_every=2 --set eval_batches=1 --set device=cpu"
)
GPT = f"train --model gpt --dataset shakespeare-char {TINY_GPT}"
# two epochs fitted to a time budget (the first inside the warm-up, as fitting requires)
FITTED = (
    "--epochs 2 --set time_budget_s={budget} --set fit_to_budget=true "
    "--set schedule=warmup-linear --set warmup_steps=8"
)
TEXT = "".join(chr(97 + (i * 7) % 26) for i in range(400))  # 26 letters, 400 characters


ERRORS_DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


def synthetic(*extra) -> list[str]:
    return [*shlex.split(SYNTHETIC), *map(str, extra)]


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict:
    """Every path under `folder`; files with size, mtime and mode (needs no read permission).

    A folder's own mtime is left out: a temporary made and removed again changes it.
    """
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        key = str(path.relative_to(folder))
        state[key] = "folder" if path.is_dir() else (info.st_size, info.st_mtime_ns, info.st_mode)
    return state


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run of tiny_mlp on the synthetic set (its folder)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(synthetic("--out", run_dir)) == 0
    packed = run_dir.parent / "model.safetensors"
    assert main(["export", str(run_dir), "--format", "packed", "--out", str(packed)]) == 0
    return run_dir


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- preparing a case's folder -----------------------------------------------------------------


def deny_reading(monkeypatch, path: Path) -> None:
    """Make `path` unreadable. chmod 000 suffices for users; root ignores file modes, so the
    kernel's answer (EACCES at open) is also given in-process at open() for that one path."""
    path.chmod(0)
    target = str(path.resolve())
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(Path(file).resolve()) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


def edit_checkpoint(path: Path, **changes) -> None:
    record = torch.load(path, weights_only=True)
    record.update(changes)
    torch.save(record, path)


def flip_byte_in_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    offset = data.index(b"archive/data/0") + 200  # inside the first tensor's bytes
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def corrupt_batch(folder: Path, key: bytes, value) -> None:
    good = fake_batch(CIFAR10, PER_FILE, 2)
    write_pickle(folder / "data" / CIFAR10.folder / "data_batch_3", {**good, key: value})


# Preparations of a case's folder: prepare(folder, trained run folder, monkeypatch).


def write(name: str, content: bytes):
    def prepare(folder, trained, monkeypatch):
        (folder / name).write_bytes(content)

    return prepare


def then(*steps):
    def prepare(folder, trained, monkeypatch):
        for step in steps:
            step(folder, trained, monkeypatch)

    return prepare


def no_download(folder, trained, monkeypatch):
    """Downloads on, an unreachable address, and a downloader that fails the test if called."""

    def download_called(*args, **kwargs):
        pytest.fail("a download started before the settings were checked")

    monkeypatch.setattr(cifar_module, "download_and_extract", download_called)
    monkeypatch.setenv("QTRAIN_CIFAR10_URL", "http://127.0.0.1:9/unreachable.tar.gz")


def with_run(folder, trained, monkeypatch):
    shutil.copytree(trained, folder / "run")


def with_cifar(folder, trained, monkeypatch):
    write_fake_cifar(folder / "data")


def with_text(folder, trained, monkeypatch):
    (folder / "a.txt").write_text(TEXT)


def with_gpt_run(folder, trained, monkeypatch):
    """A finished two-step tiny GPT run in gpt/ on a.txt, and b.txt with other characters."""
    with_text(folder, trained, monkeypatch)
    (folder / "b.txt").write_text(TEXT.upper())
    argv = [*shlex.split(GPT), "--set", f"text_file={folder / 'a.txt'}", "--out", folder / "gpt"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(a) for a in argv]) == 0


def with_distilled_run(folder, trained, monkeypatch):
    """gpt/ as `with_gpt_run`, another teacher gpt2/ (seed 1), and kd/, a finished run that
    distilled from gpt/."""
    with_gpt_run(folder, trained, monkeypatch)
    text = ["--set", f"text_file={folder / 'a.txt'}"]
    for out, extra in (("gpt2", ["--set", "seed=1"]), ("kd", ["--set", "distill_from=gpt"])):
        argv = [*shlex.split(GPT), *text, *extra, "--out", folder / out]
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([str(a) for a in argv]) == 0


def with_fitted_run(folder, trained, monkeypatch):
    """fitted/: a finished two-epoch run whose schedule was fitted to a 1000-s budget."""
    argv = [*shlex.split(f"{SYNTHETIC} {FITTED.format(budget=1000)}"), "--out", folder / "fitted"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(a) for a in argv]) == 0


def with_other_run_in_an_experiment(folder, trained, monkeypatch):
    """rep/fig7-smoke/wd0 holds the tiny run, not the cell `reproduce fig7` trains there."""
    shutil.copytree(trained, folder / "rep" / "fig7-smoke" / "wd0")


def empty_data_dir(folder, trained, monkeypatch):
    (folder / "data").mkdir()


def batch_missing(folder, trained, monkeypatch):
    (folder / "data" / CIFAR10.folder / "data_batch_3").unlink()


def batch_truncated(folder, trained, monkeypatch):
    path = folder / "data" / CIFAR10.folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:4000])


def batch_wrong_shape(folder, trained, monkeypatch):
    corrupt_batch(folder, b"data", np.zeros((PER_FILE, 1024), np.uint8))


def batch_labels_out_of_range(folder, trained, monkeypatch):
    corrupt_batch(folder, b"labels", [10] * PER_FILE)


def batch_labels_short(folder, trained, monkeypatch):
    corrupt_batch(folder, b"labels", [0] * (PER_FILE - 1))


def batch_unreadable(folder, trained, monkeypatch):
    deny_reading(monkeypatch, folder / "data" / CIFAR10.folder / "data_batch_3")


def archive_garbled(folder, trained, monkeypatch):
    (folder / "data").mkdir()
    (folder / "data" / CIFAR10.archive).write_bytes(b"\x1f\x8b" + bytes(range(256)) * 2)


def config_unreadable(folder, trained, monkeypatch):
    deny_reading(monkeypatch, folder / "c.toml")


def checkpoint_truncated(folder, trained, monkeypatch):
    path = folder / "run" / rundir.CHECKPOINT
    path.write_bytes(path.read_bytes()[:30000])


def checkpoint_bit_flip(folder, trained, monkeypatch):
    flip_byte_in_weights(folder / "run" / rundir.CHECKPOINT)


def checkpoint_unreadable(folder, trained, monkeypatch):
    deny_reading(monkeypatch, folder / "run" / rundir.CHECKPOINT)


def checkpoint_newer_format(folder, trained, monkeypatch):
    edit_checkpoint(folder / "run" / rundir.CHECKPOINT, format_version=2, qtrain_version="9.0")


def checkpoint_other_model(folder, trained, monkeypatch):
    path = folder / "run" / rundir.CHECKPOINT
    edit_checkpoint(path, model={**load_checkpoint(path)["model"], "name": "tiny_cnn"})


def foreign_torch_file(folder, trained, monkeypatch):
    torch.save({"weight": torch.ones(3)}, folder / "w.pt")


def checkpoint_weight_edited(folder, trained, monkeypatch):
    """One quantized weight of the run's checkpoint scaled by 1.5: off its grid, with or
    without scales, as no quantized method leaves it."""
    with_run(folder, trained, monkeypatch)
    path = folder / "run" / rundir.CHECKPOINT
    record = torch.load(path, weights_only=True)
    weight = record["model_state"][record["quantized"][0]]
    weight[(0,) * weight.dim()] *= 1.5
    torch.save(record, path)


def checkpoint_in_float_phase(folder, trained, monkeypatch):
    """The run's checkpoint as one saved before step F of `float_fraction` 0.5 looks: not
    finished, its quantized weights still float (tests/test_float_first.py saves a real one)."""
    checkpoint_weight_edited(folder, trained, monkeypatch)
    path = folder / "run" / rundir.CHECKPOINT
    record = torch.load(path, weights_only=True)
    record["config"]["float_fraction"] = 0.5
    record["training"]["finished"] = False
    torch.save(record, path)


def packed_truncated(folder, trained, monkeypatch):
    packed = (trained.parent / "model.safetensors").read_bytes()
    (folder / "m.safetensors").write_bytes(packed[:2000])


def packed_copy(folder, trained, monkeypatch):
    (folder / "m.safetensors").write_bytes((trained.parent / "model.safetensors").read_bytes())


def packed_header_edited(folder, trained, monkeypatch):
    """The JSON header's Δ edited in place (same length), as a hand edit or a bit flip would."""
    packed = (trained.parent / "model.safetensors").read_bytes()
    stored = b'\\"delta\\": 1.0'  # the header is JSON inside a JSON string
    assert stored in packed
    (folder / "m.safetensors").write_bytes(packed.replace(stored, stored.replace(b"1", b"7"), 1))


@dataclass(frozen=True)
class Case:
    area: str
    input: str  # what the user got wrong, as docs/errors.md lists it
    argv: str  # {syn}: a tiny synthetic training run; {cifar}: the same on data/ (CIFAR-10)
    says: str  # what the one line must contain
    prepare: object = None

    def arguments(self) -> list[str]:
        return shlex.split(self.argv.format(syn=SYNTHETIC, cifar=CIFAR, gpt=GPT))


CASES = [
    Case("cli", "misspelt command", "trian", "did you mean 'train'"),
    Case("cli", "misspelt choice", "list model", "did you mean 'models'"),
    Case("cli", "text where a number goes", "train --epochs ten", "invalid int value: 'ten'"),
    Case("cli", "unknown option", "train --learning-rate 0.1", "unrecognized arguments"),
    Case("cli", "required option missing", "export run", "arguments are required: --format"),
    Case("cli", "unknown model", "{syn} --model vgg99 --out o", "did you mean 'vgg9'"),
    Case("cli", "unknown method", "{syn} --method bc-adamm --out o", "did you mean 'bc-adam'"),
    Case("cli", "unknown data set", "{syn} --dataset cifar11 --out o", "did you mean 'cifar10'"),
    Case("cli", "misspelt method, CIFAR not downloaded yet",
         "train --dataset cifar10 --download --method sr-adm --out o",
         "unknown method 'sr-adm' (did you mean 'sr-adam'?)", no_download),
    Case("cli", "unknown grid", "{syn} --grid quaternary --out o", "unknown grid 'quaternary'"),
    Case("cli", "unknown device", "{syn} --set device=tpu --out o", "unknown device 'tpu'"),
    Case("cli", "unknown weight scale", "{syn} --set scale=absmax --out o",
         "unknown scale 'absmax' (did you mean 'absmean'?)"),
    Case("cli", "scale the method cannot use", "{syn} --method sr-adam --set scale=absmean --out o",
         "which sr does not keep; use one of none, he"),
    Case("cli", "binary activations on a model without them",
         "{syn} --set activations=binary --out o", "does not support binary activations"),
    Case("cli", "Bop on a grid other than binary", "{syn} --method bop-adam --grid ternary --out o",
         "needs the binary grid"),
    Case("cli", "speednet's order of BatchNorm and the pool on another model",
         "{syn} --set norm_after_pool=true --out o",
         "norm_after_pool applies to image models that take it (speednet), not to model "
         "'tiny_mlp'; set it to False"),
    Case("cli", "Bop settings for another method", "{syn} --set bop_tau=1e-6 --out o",
         "bop_tau applies to bop-adam and bop2-adam, not to method 'bc-adam'; leave it unset"),
    Case("cli", "unknown source of SR's uniforms",
         "{syn} --method sr-adam --set sr_uniforms=philox --out o",
         "sr_uniforms must be one of torch, counter, got 'philox'"),
    Case("cli", "SR's uniforms for a method that rounds deterministically",
         "{syn} --set sr_uniforms=counter --out o",
         "sr_uniforms applies to methods that round stochastically (sr-*, bc-* with "
         "bc_stochastic), not to method 'bc-adam' without bc_stochastic; set it to 'torch'"),
    Case("cli", "a flip-count cadence below one step", "{syn} --set flip_every=0 --out o",
         "flip_every must be a whole number of steps, 1 or more (1 counts every step), got 0"),
    Case("cli", "unknown flip", "{syn} --set flip=alternate --out o",
         "unknown flip 'alternate' (did you mean 'alternating'?); choose one of random, "
         "alternating"),
    Case("cli", "a reflected crop wider than the image",
         "{syn} --set augment=true --set crop_padding=64 --set crop_fill=reflect --out o",
         "crop_padding (64) must be smaller than its"),
    Case("cli", "unknown logger", "{syn} --set log=tensorbord --out o",
         "did you mean 'tensorboard'"),
    Case("cli", "whitening init on a model without a whitening layer",
         "{syn} --set whiten_init=true --out o", "set whiten_init = false or choose speednet"),
    Case("cli", "unknown test-time augmentation", "{syn} --set tta=rotate --out o",
         "unknown tta 'rotate'"),
    Case("config", "label smoothing of 1 or more", "{syn} --set label_smoothing=1.5 --out o",
         "label_smoothing must be in [0, 1)"),
    Case("config", "EMA decay of 1 or more", "{syn} --set ema_decay=1.0 --out o",
         "ema_decay must be in [0, 1)"),
    Case("config", "EMA horizon of 1 or more", "{syn} --set ema_horizon=1.5 --out o",
         "ema_horizon must be in [0, 1)"),
    Case("config", "a float phase as long as the run", "{syn} --set float_fraction=1 --out o",
         "float_fraction must be in [0, 1)"),
    Case("config", "a float phase for a method without one",
         "{syn} --method fp-adam --set float_fraction=0.3 --out o",
         "float_fraction applies to methods that put float weights on the grid"),
    Case("config", "a ramp onto the grid for a method without w_r",
         "{syn} --method sr-adam --set quant_ramp=0.1 --out o",
         "quant_ramp applies to BinaryConnect (bc-*) methods"),
    Case("config", "a float phase and a ramp as long as the run",
         "{syn} --set float_fraction=0.7 --set quant_ramp=0.3 --out o",
         "add up to the whole run"),
    Case("config", "both an EMA decay and an EMA horizon",
         "{syn} --set ema_decay=0.9 --set ema_horizon=0.05 --out o",
         "set one of them to 0"),
    Case("config", "validation split as large as the data", "{syn} --set val_images=100000 --out o",
         "the data set has 512 training images"),
    Case("cli", "--out is an existing file", "{syn} --out taken",
         "taken is a file where a folder is needed", write("taken", b"x")),
    Case("config", "misspelt key", "{syn} --set weight_decy=1e-4 --out o",
         "did you mean 'weight_decay'"),
    Case("config", "--set without =", "{syn} --set epochs --out o", "--set expects key=value"),
    Case("config", "wrong type", "{syn} --set batch_size=2.5 --out o",
         "'batch_size' needs a value of type int"),
    Case("config", "negative epochs", "{syn} --set epochs=-3 --out o",
         "epochs must be a whole number > 0"),
    Case("config", "zero learning rate", "{syn} --lr 0 --out o", "lr must be a finite number > 0"),
    Case("config", "NaN learning rate", "{syn} --lr nan --out o",
         "lr must be a finite number > 0"),
    Case("config", "absurd learning rate", "{syn} --lr 1e38 --out o", "lr must be at most 1e+06"),
    Case("config", "momentum of 1 or more", "{syn} --set momentum=1.5 --out o",
         "momentum must be in [0, 1)"),
    Case("config", "unknown schedule", "{syn} --set schedule=linear --out o",
         "schedule must be one of"),
    Case("config", "unknown policy", "{syn} --set policy=everything --out o",
         "unknown quantization policy 'everything'"),
    Case("config", "batch larger than the data", "{syn} --batch-size 100000 --out o",
         "batch size 100000 is larger than the 512 images"),
    Case("config", "model that cannot take the data", "{syn} --model vgg9 --dataset digits --out o",
         "model 'vgg9' takes 32×32 images but data set 'digits' has 8×8 images"),
    Case("config", "missing config file", "{syn} --config nope.toml --out o",
         "config file nope.toml does not exist"),
    Case("config", "config file with bad syntax", "{syn} --config c.toml --out o",
         "is not valid TOML", write("c.toml", b"epochs = [unclosed\n")),
    Case("config", "config file that is binary", "{syn} --config c.toml --out o",
         "is not valid TOML", write("c.toml", bytes(range(256)))),
    Case("config", "config file with a [table]", "{syn} --config c.toml --out o",
         "configs are flat", write("c.toml", b"[train]\nepochs = 3\n")),
    Case("config", "unknown key in a config file", "{syn} --config c.toml --out o",
         "did you mean 'epochs'", write("c.toml", b"epoch = 3\n")),
    Case("config", "unreadable config file", "{syn} --config c.toml --out o",
         "Permission denied", then(write("c.toml", b"epochs = 3\n"), config_unreadable)),
    Case("data", "CIFAR not downloaded", "{cifar} --out o", "CIFAR-10 was not found in data",
         empty_data_dir),
    Case("data", "--data-dir is a file", "{syn} --dataset cifar10 --data-dir taken "
         "--no-download --out o", "was not found in taken", write("taken", b"x")),
    Case("data", "ImageNet folder missing",
         "{syn} --model tiny_cnn --dataset imagenet --data-dir nope --out o",
         "nope/train does not exist; put the ImageNet split there"),
    Case("data", "batch file missing", "{cifar} --out o", "lacks data_batch_3",
         then(with_cifar, batch_missing)),
    Case("data", "truncated batch file", "{cifar} --out o", "is truncated or corrupt",
         then(with_cifar, batch_truncated)),
    Case("data", "images of the wrong shape", "{cifar} --out o", "has data of shape (20, 1024)",
         then(with_cifar, batch_wrong_shape)),
    Case("data", "labels out of range", "{cifar} --out o", "outside 0..9 of CIFAR-10",
         then(with_cifar, batch_labels_out_of_range)),
    Case("data", "fewer labels than images", "{cifar} --out o", "not 20 integers (one per image)",
         then(with_cifar, batch_labels_short)),
    Case("data", "unreadable batch file", "{cifar} --out o", "Permission denied",
         then(with_cifar, batch_unreadable)),
    Case("data", "archive that is not a tar.gz", "{cifar} --out o",
         "cifar-10-python.tar.gz is truncated or corrupt (not a gzip file)",
         archive_garbled),
    Case("checkpoint", "missing checkpoint", "eval nope.pt", "nope.pt does not exist"),
    Case("checkpoint", "folder without a checkpoint", "eval .",
         "is a folder without checkpoint.pt"),
    Case("checkpoint", "text file as checkpoint", "eval notes.pt",
         "notes.pt is neither a qtrain checkpoint nor a packed model file",
         write("notes.pt", b"not a checkpoint\n")),
    Case("checkpoint", "empty checkpoint file", "eval empty.pt",
         "empty.pt is neither a qtrain checkpoint nor a packed model file",
         write("empty.pt", b"")),
    Case("checkpoint", "truncated checkpoint", "eval run", "is not a readable qtrain checkpoint",
         then(with_run, checkpoint_truncated)),
    Case("checkpoint", "bit flip inside the weights", "eval run", "fails the CRC-32 check",
         then(with_run, checkpoint_bit_flip)),
    Case("checkpoint", "PyTorch file of another program", "eval w.pt",
         "not a qtrain checkpoint", foreign_torch_file),
    Case("checkpoint", "checkpoint from a newer version", "eval run", "has checkpoint format 2",
         then(with_run, checkpoint_newer_format)),
    Case("checkpoint", "weights of another model", "eval run", "do not fit model 'tiny_cnn'",
         then(with_run, checkpoint_other_model)),
    Case("checkpoint", "unreadable checkpoint", "eval run", "cannot be read",
         then(with_run, checkpoint_unreadable)),
    Case("checkpoint", "unknown test-time augmentation for eval", "eval run --tta flips",
         "unknown tta 'flips'", with_run),
    Case("checkpoint", "unknown weights for eval", "eval run --weights lve",
         "unknown weights 'lve'", with_run),
    Case("checkpoint", "unknown split for eval", "eval run --split vl",
         "unknown split 'vl'", with_run),
    Case("checkpoint", "validation split of a run that held none out", "eval run --split val",
         "held out no validation images", with_run),
    Case("checkpoint", "live weights of a packed file", "eval m.safetensors --weights live",
         "holds only the weights its run reported", packed_copy),
    Case("checkpoint", "resume with another model", "{syn} --model tiny_cnn --out run --resume",
         "trained with model='tiny_mlp'", with_run),
    Case("checkpoint", "resume with another learning rate", "{syn} --lr 0.5 --out run --resume",
         "trained with lr=0.01, not 0.5", with_run),
    Case("checkpoint", "resume with more epochs of a step schedule",
         "{syn} --epochs 3 --out run --resume", "trained with epochs=1, not 3", with_run),
    Case("checkpoint", "resume a run fitted to its time budget with another budget",
         "{syn} " + FITTED.format(budget=2000) + " --out fitted --resume",
         "fitted its schedule to time_budget_s=1000 at the end of its first epoch, not 2000; "
         "resume with --set time_budget_s=1000", with_fitted_run),
    Case("checkpoint", "new run into an existing run", "{syn} --out run",
         "already holds a run; continue it with --resume or choose another --out folder", with_run),
    Case("checkpoint", "resume from a damaged checkpoint", "{syn} --out run --resume",
         "fails the CRC-32 check", then(with_run, checkpoint_bit_flip)),
    Case("export", "missing source", "export nope.pt --format packed --out m",
         "nope.pt does not exist"),
    Case("export", "output over its own source",
         "export run/checkpoint.pt --format packed --out run/checkpoint.pt",
         "is the source file itself", with_run),
    Case("export", "impossible input size", "export run --format onnx --out m --input-size 0",
         "--input-size must be a positive", with_run),
    Case("export", "unsupported ONNX opset", "export run --format onnx --out m --opset 9",
         "opset must be >= 17", with_run),
    Case("export", "output inside a file", "export run --format packed --out taken/m",
         "taken is a file where a folder is needed", then(with_run, write("taken", b"x"))),
    Case("export", "a quantized run's weight changed after training",
         "export run --format packed --out m", "so the checkpoint was changed after training",
         checkpoint_weight_edited),
    Case("export", "a run interrupted inside its float phase",
         "export run --format packed --out m", "the run was saved inside its float phase",
         checkpoint_in_float_phase),
    Case("export", "truncated packed file", "summary m.safetensors",
         "m.safetensors is not a readable safetensors file",
         packed_truncated),
    Case("export", "model options with a file", "summary run --grid ternary",
         "applies to model names only", with_run),
    Case("export", "corrupted ONNX file given to eval", "eval m.onnx --data-dir data",
         "m.onnx is neither a qtrain checkpoint nor a packed model file",
         write("m.onnx", b"\x08\x07\x12\x07pytorch" + bytes(range(200)))),
    Case("export", "packed header edited", "eval m.safetensors --data-dir data",
         "fails its CRC-32 check", packed_header_edited),
    Case("export", "summary of an unknown name", "summary vgg99",
         "neither an existing file nor a registered model"),
    Case("data", "missing text file", "{gpt} --set text_file=none.txt --out o",
         "text file none.txt does not exist"),
    Case("data", "empty text file", "{gpt} --set text_file=e.txt --out o",
         "text file e.txt is empty", write("e.txt", b"")),
    Case("data", "binary text file", "{gpt} --set text_file=b.bin --out o",
         "holds NUL bytes, so it is binary", write("b.bin", b"\x00\x01" * 100)),
    Case("data", "context longer than the text", "{gpt} --set text_file=a.txt "
         "--set block_size=64 --out o", "shorter than one window of block_size + 1 = 65",
         with_text),
    Case("checkpoint", "resume on a text with other characters",
         "{gpt} --set text_file=b.txt --out gpt --resume",
         "was trained on a text with the 26 characters", with_gpt_run),
    Case("config", "gpt with a width", "{gpt} --set text_file=a.txt --width 0.5 --out o",
         "reads text and has no width", with_text),
    Case("config", "gpt with binary activations",
         "{gpt} --set text_file=a.txt --set activations=binary --out o",
         "binary activations apply to the image models only", with_text),
    Case("config", "gpt on an image data set", "{gpt} --dataset cifar10 --out o",
         "model 'gpt' reads text but data set 'cifar10' holds images"),
    Case("config", "an image model on text", "{gpt} --model tiny_mlp --out o",
         "model 'tiny_mlp' reads images but data set 'shakespeare-char' holds text"),
    Case("cli", "sample prompt with unknown characters", "sample gpt --prompt Zebra",
         "characters the model never saw ('Z')", with_gpt_run),
    Case("cli", "sample of an image model", "sample run", "trained on images", with_run),
    Case("config", "a key of Adam on an SGD method",
         "{syn} --method bc-sgd --set beta2=0.99 --out o",
         "beta2 applies to Adam and AdamW methods, not to method 'bc-sgd'; set it to 0.999"),
    Case("config", "an image key on text",
         "{gpt} --set text_file=a.txt --set augment=true --out o",
         "augment applies to image data sets, not to data set 'shakespeare-char'", with_text),
    Case("config", "a warm-up schedule's key on a step schedule",
         "{syn} --set min_lr=0.001 --out o",
         "min_lr applies to the per-step schedules"),
    Case("config", "activation bits outside 2..8", "{syn} --set act_bits=9 --out o",
         "act_bits must be an integer from 2 to 8"),
    Case("config", "activation bits that are not an integer", "{syn} --set act_bits=3.5 --out o",
         "'act_bits' needs an integer from 2 to 8"),
    Case("config", "activation bits without a quantized linear layer",
         "{syn} --set act_bits=8 --out o",
         "policy 'conv' quantizes no nn.Linear of model 'tiny_mlp'; quantize linear layers with "
         "--set policy=linear"),
    Case("config", "a quantizing method whose policy quantizes nothing",
         "{gpt} --method bc-adam --set policy=conv --out o",
         "policy 'conv' quantizes no parameter of model 'gpt', so bc-adam would train it in "
         "full precision; use --set policy=linear"),
    Case("config", "unknown activation norm",
         "{syn} --set act_bits=8 --set policy=linear --set act_norm=layer --out o",
         "unknown act_norm 'layer'; choose one of rms, none"),
    Case("config", "activation norm without activation bits", "{syn} --set act_norm=none --out o",
         "act_norm applies to runs that set act_bits, not to a run without act_bits"),
    Case("cli", "experiment folder holding another run", "reproduce fig7 --budget smoke --out rep",
         "rep/fig7-smoke/wd0 holds a run with model='tiny_mlp', not 'vgg_bc'",
         with_other_run_in_an_experiment),
    Case("cli", "unknown experiment budget", "reproduce table1 --budget shrot --out rep",
         "unknown table1 budget 'shrot' (did you mean 'short'?)"),
    Case("cli", "rows for an experiment without rows", "reproduce methods --rows vgg9-cifar10",
         "--rows applies to `reproduce table1` only"),
    Case("cli", "seeds for figure 7", "reproduce fig7 --seeds 2",
         "runs one seed; leave --seeds out"),
    Case("cli", "zero seeds", "reproduce methods --budget smoke --seeds 0 --out rep",
         "--seeds must be a whole number >= 1, got 0"),
    Case("cli", "no runs at a time", "speedrun --budget smoke --jobs 0 --out s",
         "--jobs must be a whole number >= 1, got 0"),
    Case("cli", "unknown demo budget", "demo --budget smok --out d",
         "unknown demo budget 'smok' (did you mean 'smoke'?)"),
    Case("cli", "a speedrun without a time budget",
         "speedrun --set time_budget_s=none --budget smoke --out s",
         "fit_to_budget applies to runs with a time_budget_s, not to a run without "
         "time_budget_s; set it to False"),
    Case("cli", "a speedrun that chooses its width without fitting its length",
         "speedrun --set fit_to_budget=false --budget smoke --out s",
         "fit_width chooses the width from the time budget that fit_to_budget fits the run "
         "to; set fit_to_budget = true as well, or fit_width = false"),
    Case("config", "a fitted run whose warm-up ends inside the first epoch",
         "train --model speednet --dataset synthetic --set time_budget_s=60 --set "
         "fit_to_budget=true --set schedule=warmup-linear --set warmup_steps=2 --out o",
         "fit_to_budget chooses the epochs at the end of the first, whose learning rate must "
         "not depend on them, but the warm-up ends at step 2 of its 4; set warmup_steps to at "
         "least 4, or turn fit_to_budget off"),
    Case("config", "init_from that does not exist",
         "{gpt} --set text_file=a.txt --set init_from=nowhere --out o",
         "init_from nowhere does not exist; check the path", with_text),
    Case("config", "distill_from that does not exist",
         "{gpt} --set text_file=a.txt --set distill_from=nowhere --out o",
         "distill_from nowhere does not exist; check the path", with_text),
    Case("config", "init_from that names no model", "{gpt} --set text_file=a.txt "
         "--set init_from=notes.txt --out o", "init_from notes.txt is not a qtrain run folder",
         then(with_text, write("notes.txt", b"not a model\n"))),
    Case("config", "init_from of another architecture",
         "{gpt} --set text_file=a.txt --set n_embd=32 --set init_from=gpt --out o",
         "init_from gpt holds a model with n_embd=16, not this run's n_embd=32", with_gpt_run),
    Case("config", "teacher of another vocabulary",
         "{gpt} --set text_file=c.txt --set distill_from=gpt --out o",
         "the teacher at gpt has 26 tokens but this run's vocabulary has 20",
         then(with_gpt_run, write("c.txt", "".join(chr(97 + (i * 7) % 20)
                                                   for i in range(400)).encode()))),
    Case("config", "distill_weight outside [0, 1]",
         "{gpt} --set distill_from=gpt --set distill_weight=1.5 --out o",
         "distill_weight must be in [0, 1] (0: cross-entropy only, 1: the teacher only)"),
    Case("config", "distillation temperature of 0",
         "{gpt} --set distill_from=gpt --set distill_temperature=0 --out o",
         "distill_temperature must be a finite number > 0"),
    Case("config", "distillation key without a teacher", "{syn} --set distill_weight=0.3 --out o",
         "distill_weight applies to runs that distill (distill_from set), not to a run without "
         "distill_from; set it to 0.5"),
    Case("checkpoint", "resume with another teacher",
         "{gpt} --set text_file=a.txt --set distill_from=gpt2 --out kd --resume",
         "the teacher at gpt2 is not the one the run in kd started with", with_distilled_run),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}: {c.input}" for c in CASES])
def test_bad_input_ends_with_one_clear_line_and_no_output(
    case, trained, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTRAIN_DATA", str(tmp_path / "cache"))  # never the user's cache
    if case.prepare is not None:
        case.prepare(tmp_path, trained, monkeypatch)
    before = snapshot(tmp_path)
    code, out, err = run(case.arguments(), capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("qtrain: error: "), err
    assert case.says in lines[0]
    assert out == ""
    assert snapshot(tmp_path) == before, "the failed command left output behind"


def test_the_catalogue_covers_every_area_and_docs_errors_md_lists_each_case():
    areas = {case.area for case in CASES}
    assert areas == {"cli", "config", "data", "checkpoint", "export"} and len(CASES) >= 30
    rows = {
        tuple(cell.strip() for cell in line.split(" | ")[:2])
        for line in ERRORS_DOC.read_text().splitlines()
        if line.startswith("| ")
    }
    assert [c.input for c in CASES if (f"| {c.area}", c.input) not in rows] == []


# -- a full disk and a diverging run: the run folder keeps its last good checkpoint ----------


class _FullDiskFile:
    """A file on a disk with `room` bytes left: a longer write stores what fits, then fails."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) <= self.room:
            return self.file.write(data)
        self.file.write(data[: self.room])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


class _FullDiskOs:
    """`os` as the atomic writer sees it on a nearly full disk (otherwise the real os)."""

    def __init__(self, room: int):
        self.room = room

    def fdopen(self, fd, *args, **kwargs):
        return _FullDiskFile(os.fdopen(fd, *args, **kwargs), self.room)

    def __getattr__(self, name):
        return getattr(os, name)


# config.toml, meta.json and metrics.jsonl take < 2 kB; a tiny_mlp checkpoint about 75 kB.
ROOM_FOR_SMALL_FILES = 10_000


def test_a_full_disk_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # A constant schedule lets the one-epoch run be extended to two on resume.
    argv = synthetic("--set", "checkpoint_every_steps=2", "--set", "schedule=constant")
    argv = [*argv, "--out", run_dir]
    assert run(argv, capsys)[0] == 0
    kept = (rundir.CHECKPOINT, rundir.METRICS)
    before = {name: (run_dir / name).read_bytes() for name in kept}
    longer = [a if a != "1" else "2" for a in argv]  # --epochs 2, resumed
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic_io, "os", _FullDiskOs(ROOM_FOR_SMALL_FILES))
        code, _, err = run([*longer, "--resume"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"qtrain: error: could not write {run_dir / rundir.CHECKPOINT}: No space left on device; "
        "free space, then run the same command with --resume; the last checkpoint is intact"
    ]
    # The half-written temporary is gone; checkpoint and metrics are as epoch 1 left them.
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    assert list(run_dir.glob(".*")) == []
    # meta.json's resume record fitted: the checkpoint's write failed; config.toml is as created.
    assert len(json.loads((run_dir / rundir.META).read_text())["resumes"]) == 1
    assert "epochs = 1" in (run_dir / rundir.CONFIG).read_text()
    assert run([*longer, "--resume"], capsys)[0] == 0  # space is back: the run goes on
    assert len(rundir.read_metrics(run_dir)) == 2


def test_a_full_disk_at_the_start_leaves_no_files(tmp_path, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(atomic_io, "os", _FullDiskOs(0))
        code, _, err = run(synthetic("--out", tmp_path / "run"), capsys)
    assert code == 2 and "run/config.toml: No space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []


def test_divergence_stops_with_one_line_naming_the_lr_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    # Plain SGD at lr 1e6 on the synthetic set overflows to a NaN loss within a few steps.
    argv = synthetic("--method", "fp-sgd", "--lr", "1e6", "--set", "checkpoint_every_steps=1")
    code, _, err = run([*argv, "--out", tmp_path / "run"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    named = re.search(r"the loss became nan at epoch 1, batch (\d+);", lines[0])
    assert named, lines[0]
    assert "last good checkpoint" in lines[0] and "lower the learning rate (now 1e+06)" in lines[0]
    record = load_checkpoint(tmp_path / "run")
    assert record["training"]["sums"]["batch"] == int(named[1]) - 1  # the step before the NaN
    assert all(torch.isfinite(t).all() for t in record["model_state"].values())
