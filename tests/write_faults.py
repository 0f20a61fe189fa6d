"""Helpers of tests/test_write_faults.py: where qtrain writes files, how a write is made to
fail, and how two folders of results are compared.

`write_points()` reads qtrain's source for the calls that decide a file's path and hand it to
the atomic writer; `direct_writes()` finds writes that bypass it. `inject` makes the n-th write
of one file fail as a full disk (ENOSPC part-way through the data) or a failing disk (EIO after
it) does, and `Fault` records what the folder held and the stack at that moment.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import tarfile
import tempfile
import traceback
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import torch

from qtrain.base import io as atomic_io
from qtrain.data import download as download_module
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.records import MEASURED_KEYS

ROOT = Path(__file__).resolve().parents[1]
TEMPORARY = re.compile(r"^\..*\.(tmp|part)$|\.extract-")


# -- finding the write points in qtrain's source -------------------------------------------

ATOMIC_WRITERS = {"atomic_write_bytes": (0, "path"), "atomic_write_text": (0, "path")}


def _called(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _argument(call: ast.Call, index: int, name: str) -> ast.expr | None:
    if index < len(call.args):
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == name), None)


def _functions(tree: ast.AST) -> list[ast.FunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


@cache
def write_points() -> dict[str, list[tuple[Path, int, int]]]:
    """{"file:path expression": [(file, first line, last line) of each call]} for every call
    of a writer whose path is decided there. A function that passes one of its parameters (x
    or Path(x)) to a writer as the path is a writer too; that call is not a write point."""
    calls = []  # (file, function, its parameters, a call in it)
    for path in sorted((ROOT / "qtrain").rglob("*.py")):
        for fn in _functions(ast.parse(path.read_text())):
            params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
            calls += [(path, fn, params, c) for c in ast.walk(fn) if isinstance(c, ast.Call)]
    writers = dict(ATOMIC_WRITERS)
    while True:
        points: dict[str, list[tuple[Path, int, int]]] = {}
        grown = False
        for path, fn, params, call in calls:
            if _called(call) not in writers:
                continue
            target = _argument(call, *writers[_called(call)])
            plain = target
            if isinstance(plain, ast.Call) and _called(plain) == "Path" and plain.args:
                plain = plain.args[0]
            if isinstance(plain, ast.Name) and plain.id in params:
                if fn.name not in writers:
                    shift = 1 if params[0] in ("self", "cls") else 0
                    writers[fn.name] = (params.index(plain.id) - shift, plain.id)
                    grown = True
                continue
            key = f"{path.relative_to(ROOT).as_posix()}:{ast.unparse(target)}"
            points.setdefault(key, []).append((path, call.lineno, call.end_lineno))
        if not grown:
            return points


# Writes that bypass the atomic writer, found by pattern: file, pattern name.
DIRECT_PATTERNS = {
    "open for writing": r"(?<![\w.])open\([^)]*['\"](?:[wax]|r\+|rb\+)b?\+?['\"]",
    "write_text/write_bytes": r"\.write_(text|bytes)\(",
    "os.write": r"\bos\.write\(",
    "os.open creating": r"\bos\.open\([^)]*O_(CREAT|WRONLY|RDWR)",
    "rename": r"\bos\.(replace|rename)\(",
    "temporary file": r"\b(mkstemp|mkdtemp|NamedTemporaryFile)\(",
    "extractall": r"\.extractall\(",
    "copy/move": r"\bshutil\.(copy\w*|move)\(",
    "SummaryWriter": r"\bSummaryWriter\(",
    "torch.save": r"\btorch\.save\(",
    "savefig": r"\.savefig\(",
    "image save": r"\.save\([^)]*format=",
    "numpy save": r"\bnp\.(save|savez\w*|savetxt)\(|\.tofile\(",
}


def direct_writes() -> set[tuple[str, str]]:
    found = set()
    for path in sorted((ROOT / "qtrain").rglob("*.py")):
        text = path.read_text()
        for name, pattern in DIRECT_PATTERNS.items():
            if re.search(pattern, text):
                found.add((path.relative_to(ROOT).as_posix(), name))
    return found


# -- injecting the fault --------------------------------------------------------------------


@dataclass
class Fault:
    """Fails the `nth` write of the file called `name` with `code`, once; records what the
    folder held and where the write came from at that moment."""

    name: str
    nth: int
    code: int
    folder: Path
    seen: int = 0
    files: dict | None = None
    stack: list = field(default_factory=list)

    def due(self, name: str) -> bool:
        """Called once per write of `name`: whether this one fails."""
        if self.files is not None or not name.startswith(self.name):
            return False
        self.seen += 1
        return self.seen == self.nth

    def fire(self):
        self.files = contents(self.folder)
        self.stack = traceback.extract_stack()
        raise OSError(self.code, os.strerror(self.code))  # as the OS raises it: no file name


class FaultyFile:
    """A file whose first write stores half its data and fails (ENOSPC), or is stored and then
    fails on flush or close (EIO)."""

    def __init__(self, file, fault: Fault):
        self.file, self.fault, self.pending = file, fault, False

    def write(self, data):
        if self.fault.files is not None:
            return self.file.write(data)
        if self.fault.code == errno.ENOSPC:
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            self.fault.fire()
        self.pending = True
        return self.file.write(data)

    def flush(self):
        self.file.flush()
        if self.pending and self.fault.files is None:
            self.fault.fire()

    def close(self):
        self.file.close()
        if self.pending and self.fault.files is None:
            self.fault.fire()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        if kind is None:
            self.close()
        else:
            self.file.close()


class AtomicOs:
    """`os` and `tempfile` as the atomic writer sees them: the write of the fault's file fails
    in `write` (ENOSPC) or in `fsync` (EIO)."""

    def __init__(self, fault: Fault):
        self.fault, self.failing = fault, None

    def mkstemp(self, *args, prefix: str = "", **kwargs):
        fd, name = tempfile.mkstemp(*args, prefix=prefix, **kwargs)
        if self.fault.due(prefix[1:-1]):  # prefix: ".NAME."
            self.failing = fd
        return fd, name

    def fdopen(self, fd, *args, **kwargs):
        file = os.fdopen(fd, *args, **kwargs)
        if fd == self.failing and self.fault.code == errno.ENOSPC:
            return FaultyFile(file, self.fault)
        return file

    def fsync(self, fd):
        if fd == self.failing and self.fault.files is None:
            self.fault.fire()
        os.fsync(fd)


class Proxy:
    """`real`, with the attributes in `override` replaced."""

    def __init__(self, real, **override):
        self.__dict__.update(override, _real=real)

    def __getattr__(self, name):
        return getattr(self.__dict__["_real"], name)


def inject(patch: pytest.MonkeyPatch, kind: str, fault: Fault) -> None:
    """Make `fault` happen where a write of `kind` (atomic, tensorboard, download, extract)
    goes."""
    if kind == "atomic":
        fake = AtomicOs(fault)
        patch.setattr(atomic_io, "tempfile", Proxy(atomic_io.tempfile, mkstemp=fake.mkstemp))
        patch.setattr(atomic_io, "os", Proxy(os, fdopen=fake.fdopen, fsync=fake.fsync))
    elif kind == "tensorboard":
        from tensorboard.compat.tensorflow_stub.io.gfile import LocalFileSystem

        real = LocalFileSystem._write

        def write(self, filename, content, mode):
            if not fault.due(os.path.basename(os.fsdecode(filename))):
                return real(self, filename, content, mode)
            with open(filename, mode) as file:
                faulty = FaultyFile(file, fault)
                faulty.write(content)
                faulty.flush()

        patch.setattr(LocalFileSystem, "_write", write)
    else:
        module, real = (
            (download_module, open) if kind == "download" else (tarfile, tarfile.bltn_open)
        )

        def opened(name, mode="r", *args, **kwargs):
            file = real(name, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax")
            return FaultyFile(file, fault) if writing and fault.due(Path(name).name) else file

        attribute = "open" if kind == "download" else "bltn_open"
        patch.setattr(module, attribute, opened, raising=kind != "download")


def contents(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, leaving out temporaries, locks and TensorBoard's appended files."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(
            p.startswith(".") or p == "tensorboard" for p in relative.parts
        ):
            files[relative.as_posix()] = path.read_bytes()
    return files


def temporaries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if TEMPORARY.search(p.name)]


def without_measured(value):
    if isinstance(value, dict):
        return {k: without_measured(v) for k, v in value.items() if k not in MEASURED_KEYS}
    if isinstance(value, list):
        return [without_measured(v) for v in value]
    return value


def assert_identical(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def parse_json(text: bytes, lines: bool):
    return [json.loads(line) for line in text.splitlines() if line] if lines else json.loads(text)


def assert_same_results(got: Path, want: Path) -> None:
    """The files of two folders agree: checkpoints tensor for tensor and JSON without timing
    (meta.json, which records each command, aside); every other file byte for byte."""
    a, b = contents(got), contents(want)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(rundir.META):
            continue
        if name.endswith(".pt"):
            loaded = [without_measured(load_checkpoint(d / name)) for d in (got, want)]
            assert_identical(*loaded, name)
        elif name.endswith((".json", ".jsonl")):
            parsed = [parse_json(t, name.endswith(".jsonl")) for t in (a[name], b[name])]
            assert without_measured(parsed[0]) == without_measured(parsed[1]), name
        else:
            assert a[name] == b[name], f"{name} differs"
    if (got / "run" / "tensorboard").is_dir():
        from test_loggers import read_events, scalars

        events = [read_events(d / "run") for d in (got, want)]
        for tag in ("train_loss", "test_error", "lr"):
            assert scalars(events[0], tag) == scalars(events[1], tag), tag
