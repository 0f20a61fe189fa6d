"""Full disks and I/O errors at every write: one line, nothing lost, the same command continues.

A *write point* is a place in qtrain that decides a file's path and hands it to the atomic
writer (`qtrain.base.io.atomic_write_bytes`), directly or through a function that passes its
own path argument on (save_checkpoint, write_json, save_figure, ...). `write_points()` finds
every one by reading qtrain's source, so a new one fails `test_every_write_point_has_a_case`
until it gets a case below. The few writes that do not go through the atomic writer (TensorBoard
event files, downloads) are found by the patterns of `direct_writes()`, each listed in
DIRECT_WRITES with the case that covers it or the reason it needs none. (The scan, the fault
injection and the comparison of results live in tests/write_faults.py.)

Each case runs a real command in-process (`qtrain train`, `export`, `report`, `reproduce ...
--budget smoke`, `demo`, `speedrun`, `theory`) in a copy of a prepared folder, and fails the
n-th write of one file: ENOSPC part-way through the data (a full disk), or EIO at fsync or flush
(a failing disk). The command must exit 2 with one line on stderr naming the file and the
error; every file must be, byte for byte, what it was when the write failed (so the previous
checkpoint and metrics.jsonl are intact); no temporary may be left; the error must have come
from the write point the case names (its stack). The command the line asks for then completes,
and its results equal those of the same command never faulted (checkpoints tensor for tensor,
records without wall-clock fields, other files byte for byte).

The cells of `reproduce methods`, `fig7`, `demo` and `speedrun` are trained by the stand-in of
`fake_training` (the commands run for real; their cells' own writes are the trainer's, faulted
in the `train` cases); `reproduce lm` trains its cells for real. `test_a_real_full_tmpfs_*`
fills a real size-limited tmpfs during a run (needs root and mount permission; skipped
otherwise).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from fake_training import write_fake_run
from test_data_cifar import write_archive, write_fake_cifar
from test_data_download import serve
from write_faults import (
    ROOT,
    Fault,
    Proxy,
    assert_same_results,
    contents,
    direct_writes,
    inject,
    temporaries,
    without_measured,
    write_points,
)

from qtrain.base import io as atomic_io
from qtrain.cli import MACHINE_FIXES, TRAINING_COMMANDS, main
from qtrain.data import cifar as cifar_module
from qtrain.experiments import demo as demo_module
from qtrain.experiments import lm as lm_module
from qtrain.experiments import lm_recipes as lm_recipes_module
from qtrain.experiments import runner
from qtrain.theory import plots as theory_plots
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint

ERRNOS = (errno.ENOSPC, errno.EIO)

# Each direct write: the case that faults it, or why it needs none.
DIRECT_WRITES = {
    ("qtrain/base/io.py", "temporary file"): "the atomic writer itself: every case",
    ("qtrain/base/io.py", "rename"): "the atomic writer itself: every case",
    ("qtrain/train/checkpoint.py", "torch.save"): "into a BytesIO, written atomically",
    ("qtrain/export/packed.py", "torch.save"): "safetensors.torch.save returns bytes",
    ("qtrain/report/figures.py", "savefig"): "into a BytesIO, written atomically",
    ("qtrain/theory/plots.py", "savefig"): "into a BytesIO (the PNG is re-encoded)",
    ("qtrain/theory/plots.py", "image save"): "into the BytesIO that theory/cli.py writes",
    ("qtrain/train/loggers.py", "SummaryWriter"): "case: tensorboard events",
    ("qtrain/data/download.py", "open for writing"): "case: downloaded archive",
    ("qtrain/data/download.py", "temporary file"): "case: downloaded archive",
    ("qtrain/data/download.py", "extractall"): "case: extracted data set",
    ("qtrain/data/download.py", "rename"): "a rename within one folder: no data written",
    # The lock file (pid and command line, a few bytes) of qtrain.base.folder_lock; it holds
    # no result, and is written before anything else, so nothing can be lost there.
    ("qtrain/base/folder_lock.py", "os.open creating"): "the folder lock: no record",
    ("qtrain/base/folder_lock.py", "os.write"): "the folder lock: no record",
    ("qtrain/cli.py", "os.open creating"): "stdout pointed at /dev/null after a closed pipe",
    ("qtrain/train/meminfo.py", "write_text/write_bytes"): "/proc/self/clear_refs: no disk",
    # `export --format hf` builds a folder in a temporary beside --out and renames it into
    # place; a failed write removes it (tests/test_export_hf.py faults it with ENOSPC and EIO)
    ("qtrain/export/hf.py", "temporary file"): "the hf folder: test_export_hf.py",
    ("qtrain/export/hf.py", "write_text/write_bytes"): "the hf folder: test_export_hf.py",
    ("qtrain/export/hf.py", "rename"): "the hf folder: test_export_hf.py",
}


# -- the commands ---------------------------------------------------------------------------

TRAIN = [
    "train", "--model", "tiny_mlp", "--dataset", "synthetic", "--batch-size", "64",
    "--method", "bc-adam", "--set", "device=cpu", "--set", "channels_last=false",
    "--set", "schedule=constant", "--set", "checkpoint_every_steps=4", "--set", "threads=1",
]  # fmt: skip
SPEEDRUN = [
    "speedrun", "--model", "speednet", "--width", "0.125", "--dataset", "synthetic",
    "--epochs", "1", "--batch-size", "64", "--set", "device=cpu", "--set", "channels_last=false",
    "--set", "val_images=0", "--set", "threads=1", "--targets", "50", "--budget", "smoke",
    "--out", "out",
]  # fmt: skip
METHODS = ["reproduce", "methods", "--budget", "smoke", "--out", "out", "--no-download"]
FIG7 = ["reproduce", "fig7", "--budget", "smoke", "--out", "out"]
DEMO = ["demo", "--budget", "smoke", "--jobs", "1", "--out", "out"]  # fake cells train in-process
LM_SMOKE = [
    "reproduce", "lm", "--budget", "smoke", "--data-dir", "text", "--no-download", "--out", "out"
]  # fmt: skip
LM_RECIPES = ["reproduce", "lm-recipes", "--budget", "smoke", "--out", "out", "--no-download"]
THEORY = [
    "theory", "convex", "--quick", "--steps", "64", "--seeds", "8", "--dims", "3",
    "--out", "theory",
]  # fmt: skip
CIFAR_TRAIN = [
    "train", "--model", "tiny_mlp", "--dataset", "cifar10", "--data-dir", "data", "--epochs",
    "1", "--batch-size", "64", "--set", "device=cpu", "--set", "threads=1", "--out", "run",
]  # fmt: skip


def train(epochs: int, *extra: str, out: str = "run") -> list[str]:
    # A constant schedule lets a 1-epoch run be extended to 2 epochs by --resume.
    return [*TRAIN, "--epochs", str(epochs), *extra, "--out", out]


def write_text_data(workspace: Path) -> None:
    picks = torch.randint(20, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    (workspace / "text").mkdir()
    (workspace / "text" / "input.txt").write_text(
        "".join("abcdefghijklmnop ,.\n"[i] for i in picks)
    )


def fake_cells(patch: pytest.MonkeyPatch) -> None:
    """Cells trained by `fake_training`'s stand-in; the demo's model sizes need no checkpoint."""
    patch.setattr(runner, "train_cell", lambda c, run_dir, resume, log: write_fake_run(c, run_dir))
    sizes = {"float_bytes": 4096, "packed_bytes": 128}
    patch.setattr(demo_module, "_model_bytes", lambda run_dir: sizes)


def fake_recipes(patch: pytest.MonkeyPatch) -> None:
    """lm-recipes over `fake_cells`, with a model size that needs no checkpoint."""
    fake_cells(patch)
    patch.setattr(lm_recipes_module, "model_size", lambda run_dir: 2048)


def short_samples(patch: pytest.MonkeyPatch) -> None:
    """samples.md with 16 characters a row (generating them is most of a rerun's time)."""
    patch.setattr(lm_module, "SAMPLE_CHARS", 16)


def quick_figure(patch: pytest.MonkeyPatch) -> None:
    """The theory figure as a few bytes drawn from the result: the real one takes seconds, and
    is drawn before anything is written."""

    def draw(result: dict, file) -> None:
        file.write(b"PNG " + json.dumps(result["floors"], sort_keys=True).encode())

    patch.setattr(theory_plots, "convex_figure", draw)


@dataclass(frozen=True)
class Scenario:
    """`before` prepares a folder (commands, or functions of the folder); `command` is faulted
    in a copy of it. `patch` is applied while anything runs."""

    command: list[str]
    before: tuple = ()
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


SCENARIOS = {
    "train": Scenario(train(2)),
    "resume": Scenario(train(2, "--resume"), (train(1),)),
    "tensorboard": Scenario(
        train(2, "--set", "log=tensorboard", "--resume"), (train(1, "--set", "log=tensorboard"),)
    ),
    "export packed": Scenario(
        ["export", "run", "--format", "packed", "--out", "model.safetensors"],
        (train(1), ["export", "run", "--format", "packed", "--out", "model.safetensors"]),
    ),
    "export onnx": Scenario(
        ["export", "run", "--format", "onnx", "--out", "model.onnx"],
        (train(1), ["export", "run", "--format", "onnx", "--out", "model.onnx"]),
    ),
    "report": Scenario(
        ["report", "run", "--out", "report"], (train(1), ["report", "run", "--out", "report"])
    ),
    "methods": Scenario(METHODS, (METHODS,), fake_cells),
    "fig7": Scenario(FIG7, (FIG7,), fake_cells),
    "demo": Scenario(DEMO, (DEMO,), fake_cells),
    "speedrun": Scenario(SPEEDRUN, (SPEEDRUN,), fake_cells),
    "lm": Scenario(LM_SMOKE, (write_text_data, LM_SMOKE), short_samples),
    "lm-recipes": Scenario(LM_RECIPES, (LM_RECIPES,), fake_recipes),
    "theory": Scenario(THEORY, (THEORY,), quick_figure),
    "download": Scenario(CIFAR_TRAIN),
}


@dataclass(frozen=True)
class Point:
    """Fail the `nth` write of the file called `name` in `scenario`; the error must name a path
    matching `path`. `site` is the write point (a key of `write_points()`) the write must come
    from; `kind` says how the write is intercepted."""

    label: str
    scenario: str
    name: str
    path: str
    site: str | None = None
    nth: int = 1
    kind: str = "atomic"


RUNDIR = "qtrain/train/rundir.py"
TRAINER = "qtrain/train/trainer.py"
COLLECT = "qtrain/report/collect.py"
COMPARISON = "qtrain/experiments/comparison.py"
LM = "qtrain/experiments/lm.py"
RECIPES = "qtrain/experiments/lm_recipes.py"
POINTS = [
    Point("config.toml", "train", "config.toml", "run/config.toml", f"{RUNDIR}:run_dir / CONFIG"),
    Point("meta.json of a new run", "train", "meta.json", "run/meta.json",
          f"{RUNDIR}:run_dir / META"),
    Point("meta.json of a resume", "resume", "meta.json", "run/meta.json", f"{RUNDIR}:path"),
    Point("checkpoint.pt", "resume", "checkpoint.pt", "run/checkpoint.pt",
          f"{TRAINER}:self.run_dir / rundir.CHECKPOINT"),
    # the 1st write of a resume rewrites it from the checkpoint; the 2nd follows a new checkpoint
    Point("metrics.jsonl", "resume", "metrics.jsonl", "run/metrics.jsonl",
          f"{RUNDIR}:run_dir / METRICS", nth=2),
    Point("summary.json", "resume", "summary.json", "run/summary.json",
          f"{TRAINER}:self.run_dir / rundir.SUMMARY"),
    # writes 1-3 of a resumed run's event file are its header and purge marks; the 4th is the
    # first scalar, written by the writer's thread and reported at the flush that follows it
    Point("tensorboard events", "tensorboard", "events.out.tfevents", "run/tensorboard", nth=4,
          kind="tensorboard"),
    Point("packed file", "export packed", "model.safetensors", "model.safetensors",
          "qtrain/export/cli.py:out"),
    Point("ONNX file", "export onnx", "model.onnx", "model.onnx", "qtrain/export/cli.py:out"),
    Point("report table.md", "report", "table.md", "report/table.md",
          f"{COLLECT}:out / 'table.md'"),
    Point("report table.json", "report", "table.json", "report/table.json",
          f"{COLLECT}:out / 'table.json'"),
    Point("report curves.png", "report", "curves.png", "report/curves.png",
          f"{COLLECT}:out / 'curves.png'"),
    Point("methods table.md", "methods", "table.md", "out/methods-smoke/table.md",
          f"{COMPARISON}:folder / 'table.md'"),
    Point("methods table.json", "methods", "table.json", "out/methods-smoke/table.json",
          f"{COMPARISON}:folder / 'table.json'"),
    Point("methods curves.png", "methods", "curves.png", "out/methods-smoke/curves.png",
          f"{COMPARISON}:folder / 'curves.png'"),
    Point("fig7.png", "fig7", "fig7.png", "out/fig7-smoke/fig7.png",
          "qtrain/experiments/fig7.py:folder / 'fig7.png'"),
    Point("demo table.json", "demo", "table.json", "out/demo-smoke/table.json",
          "qtrain/experiments/demo.py:folder / 'table.json'"),
    Point("demo curves.png", "demo", "curves.png", "out/demo-smoke/curves.png",
          "qtrain/experiments/demo.py:folder / 'curves.png'"),
    Point("speedrun table.json", "speedrun", "table.json", "out/speedrun-smoke/table.json",
          "qtrain/experiments/speedrun.py:folder / 'table.json'"),
    Point("speedrun table.md", "speedrun", "table.md", "out/speedrun-smoke/table.md",
          "qtrain/experiments/speedrun.py:folder / 'table.md'"),
    Point("label.json of a cell", "lm", "label.json", r"out/lm-smoke/[\w./+-]+/label.json",
          "qtrain/experiments/runner.py:run_dir / LABEL"),
    Point("lm table.md", "lm", "table.md", "out/lm-smoke/table.md", f"{LM}:folder / 'table.md'"),
    Point("lm table.json", "lm", "table.json", "out/lm-smoke/table.json",
          f"{LM}:folder / 'table.json'"),
    Point("lm samples.md", "lm", "samples.md", "out/lm-smoke/samples.md",
          f"{LM}:folder / 'samples.md'"),
    Point("lm curves.png", "lm", "curves.png", "out/lm-smoke/curves.png",
          f"{LM}:folder / 'curves.png'"),
    Point("lm-recipes table.md", "lm-recipes", "table.md", "out/lm-recipes-smoke/table.md",
          f"{RECIPES}:folder / 'table.md'"),
    Point("lm-recipes table.json", "lm-recipes", "table.json",
          "out/lm-recipes-smoke/table.json", f"{RECIPES}:folder / 'table.json'"),
    Point("theory json", "theory", "convex.json", "theory/convex.json",
          "qtrain/theory/cli.py:out / f'{name}.json'"),
    Point("theory png", "theory", "convex.png", "theory/convex.png",
          "qtrain/theory/cli.py:out / f'{name}.png'"),
    Point("downloaded archive", "download", ".cifar-10-python.tar.gz.",
          r"/\S+/w/data/\.cifar-10-python\.tar\.gz\.\w+\.part", kind="download"),  # mkstemp's name
    Point("extracted data set", "download", "data_batch_1", "data/cifar-10-batches-py",
          kind="extract"),
]  # fmt: skip


# -- running and comparing ------------------------------------------------------------------


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The runs set one intra-op thread (threads=1); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_site(tmp_path_factory):
    """A local server publishing a fake CIFAR-10 archive: (url, md5)."""
    base = tmp_path_factory.mktemp("site")
    archive = write_archive(write_fake_cifar(base / "build"), base / cifar_module.CIFAR10.archive)
    server, url = serve(base)
    yield f"{url}/{archive.name}", hashlib.md5(archive.read_bytes()).hexdigest()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cifar_site):
    """`prepared(scenario)`: (a folder as `before` leaves it, the same after `command`)."""
    done: dict[str, tuple[Path, Path]] = {}

    def prepare(name: str) -> tuple[Path, Path]:
        if name not in done:
            scenario = SCENARIOS[name]
            start = tmp_path_factory.mktemp(name.replace(" ", "-"))
            reference = start.parent / f"{start.name}-reference"
            with pytest.MonkeyPatch.context() as patch:
                environment(patch, name, cifar_site)
                patch.chdir(start)
                for step in scenario.before:
                    if callable(step):
                        step(start)
                    else:
                        assert main(step) == 0
                shutil.copytree(start, reference)
                patch.chdir(reference)
                assert main(scenario.command) == 0
            done[name] = start, reference
        return done[name]

    return prepare


def environment(patch: pytest.MonkeyPatch, name: str, cifar_site) -> None:
    scenario = SCENARIOS[name]
    if scenario.patch is not None:
        scenario.patch(patch)
    if name == "download":
        url, md5 = cifar_site
        patch.setenv(cifar_module.CIFAR10.url_env, url)
        patch.setitem(cifar_module.SPECS, "cifar10", replace(cifar_module.CIFAR10, md5=md5))


# -- the tests ------------------------------------------------------------------------------


def test_every_write_point_has_a_case():
    """A write point added to qtrain fails here until POINTS covers it."""
    found = write_points()
    listed = {p.site for p in POINTS if p.site is not None}
    assert sorted(set(found) - listed) == [], "write points without a fault case"
    assert sorted(listed - set(found)) == [], "cases for write points that no longer exist"
    assert len(found) == 27


def test_every_direct_write_is_listed():
    """A file written without the atomic writer fails here until DIRECT_WRITES names it."""
    present = {k for k in DIRECT_WRITES if (ROOT / k[0]).exists()}
    assert direct_writes() == present
    covered = {v.split(": ", 1)[1] for v in DIRECT_WRITES.values() if v.startswith("case: ")}
    assert covered <= {p.label for p in POINTS}


def test_the_cli_knows_a_fix_for_every_machine_errno():
    assert set(MACHINE_FIXES) == set(atomic_io.MACHINE_ERRNOS)


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.label)
def test_a_failed_write_ends_with_one_line_and_the_same_command_continues(
    point, code, prepared, tmp_path, capsys, monkeypatch, cifar_site
):
    if point.kind == "tensorboard":
        pytest.importorskip("tensorboard")
    start, reference = prepared(point.scenario)
    capsys.readouterr()  # what preparing printed
    workspace = tmp_path / "w"
    shutil.copytree(start, workspace)
    monkeypatch.chdir(workspace)
    environment(monkeypatch, point.scenario, cifar_site)
    command = SCENARIOS[point.scenario].command
    fault = Fault(point.name, point.nth, code, workspace)
    with pytest.MonkeyPatch.context() as patch:
        inject(patch, point.kind, fault)
        status, err = run(command, capsys)
    assert fault.files is not None, f"the {point.nth}. write of {point.name} never happened"

    # One line naming the file and the error, no traceback (of any thread); exit 2.
    again = "with --resume" if command[0] == "train" else "again"
    kept = "the last checkpoint is intact" if command[0] in TRAINING_COMMANDS else "nothing is torn"
    pattern = (
        f"qtrain: error: could not write {point.path}: {re.escape(os.strerror(code))}; "
        f"{re.escape(MACHINE_FIXES[code])}, then run the same command {again}; {kept}"
    )
    # (demo and reproduce report progress on stderr: those lines come before it)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert re.fullmatch(pattern, lines[-1]), err
    assert not any(re.match("qtrain:|Traceback|Exception", line) for line in lines[:-1]), err
    # Nothing changed after the failed write (the previous checkpoint and records are intact);
    # no temporary is left behind; the write came from the write point this case names.
    assert contents(workspace) == fault.files
    assert temporaries(workspace) == []
    if (workspace / "run" / rundir.CHECKPOINT).exists():
        load_checkpoint(workspace / "run")
        rundir.read_metrics(workspace / "run")
    if point.site is not None:
        calls = write_points()[point.site]
        assert any(
            Path(frame.filename).resolve() == path and first <= frame.lineno <= last
            for frame in fault.stack
            for path, first, last in calls
        ), f"the failed write did not come from {point.site}"

    # The command the line names completes, with the results of a run never faulted.
    again_command = (
        [*command, "--resume"] if command[0] == "train" and "--resume" not in command else command
    )
    status, err = run(again_command, capsys)
    assert status == 0, err
    assert temporaries(workspace) == []
    assert_same_results(workspace, reference)


# -- the atomic writer on its own -----------------------------------------------------------


@pytest.mark.parametrize("stage", ["mkdir", "mkstemp", "write", "fsync", "replace"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES],
                         ids=errno.errorcode.get)  # fmt: skip
def test_the_atomic_writer_names_the_target_and_keeps_the_old_file(
    stage, code, tmp_path, monkeypatch
):
    folder = tmp_path / "new" if stage == "mkdir" else tmp_path
    target = folder / "file.bin"
    if stage != "mkdir":
        target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".file.bin.x.tmp"))

    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:1])
            fail()

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    if stage == "mkdir":
        monkeypatch.setattr(Path, "mkdir", fail)
    overrides = {
        "mkdir": {},
        "mkstemp": {"tempfile": Proxy(atomic_io.tempfile, mkstemp=fail)},
        "write": {"os": Proxy(os, fdopen=lambda fd, *a, **k: Failing(real_fdopen(fd, *a, **k)))},
        "fsync": {"os": Proxy(os, fsync=fail)},
        "replace": {"os": Proxy(os, replace=fail)},
    }[stage]
    for name, value in overrides.items():
        monkeypatch.setattr(atomic_io, name, value)
    with pytest.raises(OSError) as raised:
        atomic_io.atomic_write_bytes(target, b"new")
    error = raised.value
    machine = code in atomic_io.MACHINE_ERRNOS
    assert isinstance(error, atomic_io.WriteError) == machine
    assert isinstance(error, PermissionError) == (code == errno.EACCES)
    if stage == "mkdir":  # the folder it could not make; other errors as the OS raised them
        assert error.errno == code and (not machine or error.filename == str(folder))
        assert not folder.exists()
        return
    assert error.errno == code and error.filename == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_a_read_only_file_system_is_one_line_too(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic_io, "tempfile", Proxy(atomic_io.tempfile, mkstemp=read_only))
    monkeypatch.chdir(tmp_path)
    status, err = run(train(1), capsys)
    assert status == 2 and err.strip() == (
        "qtrain: error: could not write run/config.toml: Read-only file system; make the file "
        "system writable or choose another --out, then run the same command with --resume; "
        "the last checkpoint is intact"
    )


# -- a real full disk -----------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size_kib: int):
    """A tmpfs of `size_kib` KiB mounted on `folder`; skips the test where mounting fails."""
    folder.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and the mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda kib: subprocess.run(
            ["mount", "-o", f"remount,size={kib}k", str(folder)], check=True
        )
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_full_tmpfs_stops_the_run_with_one_line_and_resume_completes(tmp_path, capsys):
    """A tmpfs with room for one checkpoint: the second checkpoint's write fills it."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(tmp_path)
    try:
        assert run(train(2, out="reference"), capsys)[0] == 0
        checkpoint = (tmp_path / "reference" / rundir.CHECKPOINT).stat().st_size
        # Pages for the small files and one checkpoint, and half a checkpoint more: the second
        # checkpoint's temporary (beside the first) cannot fit.
        size_kib = 4 * (-(-(checkpoint * 3 // 2) // 4096) + 8)
        with tmpfs(tmp_path / "disk", size_kib) as resize:
            status, err = run(train(2, out="disk/run"), capsys)
            assert status == 2, err
            assert err.strip() == (
                "qtrain: error: could not write disk/run/checkpoint.pt: No space left on device; "
                "free space, then run the same command with --resume; the last checkpoint is "
                "intact"
            )
            run_dir = tmp_path / "disk" / "run"
            training = load_checkpoint(run_dir)["training"]
            assert (training["epoch"], training["sums"]["batch"]) == (0, 4)  # the first one
            assert rundir.read_metrics(run_dir) == without_measured(training["metrics"]) == []
            assert temporaries(tmp_path / "disk") == []
            resize(4 * 1024)  # space is back
            status, err = run(train(2, "--resume", out="disk/run"), capsys)
            assert status == 0, err
            assert_same_results(run_dir, tmp_path / "reference")
            assert temporaries(tmp_path / "disk") == []
    finally:
        monkeypatch.undo()
