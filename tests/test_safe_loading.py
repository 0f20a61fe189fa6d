"""Safe loading: no checkpoint or data file, however crafted, makes qtrain run code.

People load checkpoints and CIFAR batches they did not write. Both are pickles, and a pickle
can name any callable (`__reduce__`) to be called while it loads. Checkpoints are therefore
read with `torch.load(weights_only=True)` and CIFAR batches with an unpickler that resolves
only the numpy globals the official files contain. Each crafted file below would create a
marker file if any of its code ran; through every command that reads such a file, the marker
must never appear and the command must end with one clear line and exit code 2.
"""

from __future__ import annotations

import ast
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_cifar import PER_FILE, fake_batch, write_fake_cifar

from qtrain.cli import main
from qtrain.data.cifar import ALLOWED_GLOBALS, CIFAR10
from qtrain.train.checkpoint import FORMAT, FORMAT_VERSION

PACKAGE = Path(__file__).resolve().parents[1] / "qtrain"


class Payload:
    """Pickles as the call ``function(*args)``: how a crafted file runs code on load."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {
    "os.system": lambda marker: Payload(os.system, f"touch {shlex.quote(str(marker))}"),
    "exec": lambda marker: Payload(exec, f"open({str(marker)!r}, 'w').close()"),
}


def inst_pickle(marker: Path) -> bytes:
    """Protocol 0 with the INST opcode (`i`), which resolves its global by another path."""
    return b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, marker: Path, *names: str) -> None:
    assert not marker.exists(), "the crafted file ran code"
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qtrain: error: "), err
    assert all(name in lines[0] for name in names), lines[0]


# -- checkpoints ------------------------------------------------------------------------------


def crafted_checkpoint(path: Path, container: str, payload: str, marker: Path) -> None:
    """A file that looks like a qtrain checkpoint whose weights are a payload."""
    if container == "pickle-inst":
        path.write_bytes(inst_pickle(marker))
        return
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"name": "tiny_mlp", "num_classes": 4, "width": 1.0, "in_channels": 3},
        "method": {"name": "bc-adam", "grid": {"kind": "binary"}, "policy": "conv"},
        "quantized": [],
        "model_state": PAYLOADS[payload](marker),
    }
    if container == "zip":
        torch.save(record, path)
    elif container == "legacy":
        torch.save(record, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(record, protocol=2))


COMMANDS = {
    "eval": lambda ckpt, tmp: ["eval", ckpt],
    "export": lambda ckpt, tmp: ["export", ckpt, "--format", "packed", "--out", tmp / "m.st"],
    "summary": lambda ckpt, tmp: ["summary", ckpt],
    "resume": lambda ckpt, tmp: [
        *("train", "--model", "tiny_mlp", "--dataset", "synthetic", "--epochs", "1"),
        *("--set", "device=cpu", "--out", ckpt.parent, "--resume"),
    ],
}
CHECKPOINT_CASES = [
    (container, payload)
    for container in ("zip", "legacy", "pickle")
    for payload in sorted(PAYLOADS)
] + [("pickle-inst", "os.system")]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("container,payload", CHECKPOINT_CASES)
def test_a_crafted_checkpoint_never_runs_code(tmp_path, capsys, command, container, payload):
    marker = tmp_path / "MARKER"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    checkpoint = run_dir / "checkpoint.pt"
    crafted_checkpoint(checkpoint, container, payload, marker)
    before = checkpoint.read_bytes()
    code, out, err = run(COMMANDS[command](checkpoint, tmp_path), capsys)
    assert_refused(code, err, marker, "checkpoint.pt")
    # Nothing was written: no export, no run files beside the crafted checkpoint.
    assert out == "" and sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoint.pt", "run"]
    assert checkpoint.read_bytes() == before


def test_a_code_carrying_checkpoint_is_named_as_such(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    crafted_checkpoint(tmp_path / "model.pt", "zip", "os.system", marker)
    code, _, err = run(["eval", tmp_path / "model.pt"], capsys)
    assert_refused(code, err, marker, "refers to posix.system", "without running any code")


# -- CIFAR batch files -----------------------------------------------------------------------


def crafted_batch(path: Path, how: str, marker: Path) -> str:
    """Write a crafted batch file; returns the global that the loader must refuse.

    Keys are str and there are no bytes values: Python 3 pickles bytes at protocol 2 through
    _codecs.encode, which would be refused first and hide whether the payload is reached.
    """
    labels = [0] * PER_FILE
    if how == "protocol 2 (as official)":
        batch = {"data": PAYLOADS["os.system"](marker), "labels": labels}
        path.write_bytes(pickle.dumps(batch, protocol=2))
        return f"{os.system.__module__}.system"
    if how == "protocol 4 (STACK_GLOBAL)":
        batch = {"data": fake_batch(CIFAR10, PER_FILE, 0)[b"data"], "labels": labels}
        batch["labels"] = PAYLOADS["exec"](marker)
        path.write_bytes(pickle.dumps(batch, protocol=4))
        return "builtins.exec"
    if how == "protocol 0 (INST)":
        path.write_bytes(inst_pickle(marker))
        return "os.system"
    # numpy's own globals are allowed; the payload hides among an object array's elements.
    # (Protocol 3: an array's reduce holds bytes, see above.)
    hidden = np.empty(PER_FILE, dtype=object)
    hidden[:] = [PAYLOADS["os.system"](marker)] * PER_FILE
    path.write_bytes(pickle.dumps({"data": hidden, "labels": labels}, protocol=3))
    return f"{os.system.__module__}.system"


@pytest.mark.parametrize(
    "how",
    ["protocol 2 (as official)", "protocol 4 (STACK_GLOBAL)", "protocol 0 (INST)",
     "inside an object array"],
)  # fmt: skip
def test_a_crafted_cifar_batch_never_runs_code(tmp_path, capsys, how):
    marker = tmp_path / "MARKER"
    folder = write_fake_cifar(tmp_path / "data")
    refused = crafted_batch(folder / "data_batch_3", how, marker)
    argv = [
        *("train", "--model", "tiny_mlp", "--dataset", "cifar10", "--epochs", "1"),
        *("--data-dir", tmp_path / "data", "--no-download", "--set", "device=cpu"),
        *("--out", tmp_path / "run"),
    ]
    code, out, err = run(argv, capsys)
    assert_refused(code, err, marker, "data_batch_3", f"refers to {refused}", "never contain")
    assert out == "" and not (tmp_path / "run").exists()


def test_the_cifar_allow_list_is_what_the_official_files_reference():
    # The official batches (Python 2, numpy 1) reference these three globals; numpy 2 spells
    # the first one numpy._core. Anything added here widens what a crafted file can call.
    assert set(ALLOWED_GLOBALS) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }


# -- the source itself ---------------------------------------------------------------------

UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"),
                  ("pickle", "Unpickler"), ("dill", "load"), ("joblib", "load")}  # fmt: skip


def unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that can run code from a file: see the test's docstring."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, keywords = node.func, {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append(f"{func.id}() at line {node.lineno}")
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            continue
        owner, name = func.value.id, func.attr
        if (owner, name) in UNSAFE_LOADERS:
            found.append(f"{owner}.{name} at line {node.lineno}")
        weights_only = keywords.get("weights_only")
        if (owner, name) == ("torch", "load") and not (
            isinstance(weights_only, ast.Constant) and weights_only.value is True
        ):
            found.append(f"torch.load without weights_only=True at line {node.lineno}")
        allow_pickle = keywords.get("allow_pickle")
        if (
            owner in ("np", "numpy")
            and name == "load"
            and allow_pickle is not None
            and not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False)
        ):
            found.append(f"numpy.load with allow_pickle at line {node.lineno}")
    return found


def test_no_code_path_unpickles_without_restriction():
    """Every torch.load passes weights_only=True; no pickle/marshal load, eval or exec.

    The restricted CIFAR unpickler subclasses pickle.Unpickler (a class, not a call), so it
    passes; broadcasting a loaded checkpoint between ranks of one job is not file loading.
    """
    offenders = {
        str(path.relative_to(PACKAGE)): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := unsafe_calls(ast.parse(path.read_text(), filename=str(path))))
    }
    assert offenders == {}
    loads = [
        node
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
    ]
    assert loads, "the audit found no torch.load at all; it no longer sees the loading code"
