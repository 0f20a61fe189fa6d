"""One writer per run folder: train, speedrun, reproduce cells, export and report lock what
they write (`qtrain.base.folder_lock`), and a second process is refused with one line.

Holders are real processes: `python -c` snippets that take the lock through the library, or
`qtrain train` itself, made to stop after its first epoch's files (it sleeps inside the
metrics write) so that it holds its folder mid-run for as long as a test needs. The refused
commands run in-process (`qtrain.cli.main`) where a process of their own would prove nothing
more, and as processes where the exit code and output of the process are the point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dist_worker
import pytest
import torch

from qtrain.base.errors import UserError
from qtrain.base.folder_lock import LOCK_FILE, FolderLock
from qtrain.cli import main
from qtrain.experiments import comparison
from qtrain.train import rundir
from qtrain.train.config import RunConfig
from qtrain.train.trainer import Trainer

START_LIMIT_S = 120.0  # interpreter + torch import on a busy 2-core machine
HOLD = (
    "import sys, time\n"
    "from qtrain.base.folder_lock import FolderLock\n"
    "lock = FolderLock(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)
# `qtrain train` (the real command line) that sleeps once its first epoch's files are written.
TRAIN_THEN_HOLD = (
    "import sys, time\n"
    "from qtrain.cli import main\n"
    "from qtrain.train import rundir\n"
    "write = rundir.write_metrics\n"
    "rundir.write_metrics = lambda *args: (write(*args), time.sleep(600))\n"
    "sys.argv = ['qtrain', *sys.argv[1:]]\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
TINY = ["--model", "tiny_mlp", "--dataset", "synthetic", "--batch-size", "64", "--epochs", "2",
        "--set", "schedule=constant", "--set", "device=cpu", "--set", "threads=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """In-process runs set one intra-op thread (threads=1); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def holder(folder: Path):
    """A `python -c` process that holds `folder`'s lock until the block ends (it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout.readline() == "held\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refusal(folder: Path, pid: int) -> str:
    """The start of the one line a refused command prints, up to the holder's command."""
    return f"qtrain: error: {folder} is in use by process {pid} ("


def wait_for(path: Path, proc: subprocess.Popen, limit_s: float = START_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert proc.poll() is None, f"the holder exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- the lock itself -----------------------------------------------------------------------------


def test_a_held_folder_refuses_another_process_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with holder(run) as proc:
        assert (run / LOCK_FILE).read_text().startswith(f"{proc.pid}\npython -c ")
        with pytest.raises(UserError) as refused:
            FolderLock(run, out="run")
        assert str(refused.value).startswith(f"{run} is in use by process {proc.pid} (python -c")
        assert str(refused.value).endswith("; wait for it to finish or choose another run folder")


def test_a_waiting_lock_takes_the_folder_when_its_holder_dies(tmp_path, caplog):
    """`wait=True` (turn-taking, as data downloads use it) blocks instead of refusing, says
    whom it waits for, and holds the folder once the holder is gone."""
    run = tmp_path / "data"
    with holder(run) as proc:
        taken = []
        waiter = threading.Thread(target=lambda: taken.append(FolderLock(run, wait=True)))
        with caplog.at_level(logging.INFO, logger="qtrain.base.folder_lock"):
            waiter.start()
            time.sleep(0.5)
            assert waiter.is_alive() and not taken  # still waiting while the holder lives
    waiter.join(timeout=START_LIMIT_S)
    assert len(taken) == 1
    assert (run / LOCK_FILE).read_text().startswith(f"{os.getpid()}\n")
    assert f"waiting for process {proc.pid} (python -c" in caplog.text
    taken[0].release()
    assert list(run.iterdir()) == []  # the lock file goes; the folder was the holder's


def test_a_waiting_lock_on_a_folder_its_own_thread_holds_does_not_wait_for_itself(tmp_path):
    """A run whose data folder is its run folder: the download's waiting lock comes at once,
    and releasing it leaves the run's lock in place."""
    with FolderLock(tmp_path / "run", out="run"):
        done = []
        inner = threading.Thread(
            target=lambda: done.append(FolderLock(tmp_path / "run", wait=True))
        )
        with FolderLock(tmp_path / "run", wait=True):
            pass
        assert (tmp_path / "run" / LOCK_FILE).read_text().startswith(f"{os.getpid()}\n")
        with pytest.raises(UserError, match="is in use by process"):  # without wait: refused
            FolderLock(tmp_path / "run")
        inner.start()  # another thread is not the holder: it waits
        inner.join(timeout=0.5)
        assert inner.is_alive() and not done
    inner.join(timeout=START_LIMIT_S)
    assert len(done) == 1
    done[0].release()
    assert not (tmp_path / "run").exists()


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    with holder(tmp_path) as proc:
        pass  # killed with SIGKILL: it never released
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"{proc.pid}\n")  # left behind
    with FolderLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"{os.getpid()}\n")
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_leaves_no_lock_file_and_no_empty_folder_it_made(tmp_path):
    with FolderLock(tmp_path / "a" / "b") as lock:
        with pytest.raises(UserError, match=f"in use by process {os.getpid()} "):
            FolderLock(tmp_path / "a" / "b")  # a second lock in one process is refused too
        with FolderLock(tmp_path / "a"):  # a folder and its parent are locked apart
            pass
    assert list(tmp_path.iterdir()) == []
    with FolderLock(tmp_path / "a" / "b"):
        (tmp_path / "a" / "b" / "out.txt").write_text("kept")
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "b", "out.txt"]
    lock.release()  # twice: harmless
    FolderLock(tmp_path / "dropped")  # never released: let go of when garbage-collected
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


FORK = (
    "import os, sys\n"
    "from qtrain.base.folder_lock import FolderLock\n"
    "lock = FolderLock(sys.argv[1])\n"
    "if os.fork() == 0:\n"
    "    sys.exit(0)  # a normal exit: the child's exit handlers run, the lock's among them\n"
    "os.wait()\n"
    "print(lock.path.exists())\n"
)


def test_a_forked_child_that_exits_leaves_its_parents_lock_alone(tmp_path):
    done = subprocess.run([sys.executable, "-c", FORK, tmp_path], capture_output=True, text=True)
    assert done.stdout == "True\n", done.stderr


# Takes and releases the folder's lock `rounds` times; while holding it, appends "in PID",
# waits 2 ms, appends "out PID" to the log.
CONTENDER = (
    "import os, sys, time\n"
    "from qtrain.base.errors import UserError\n"
    "from qtrain.base.folder_lock import FolderLock\n"
    "folder, log, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "while rounds:\n"
    "    try:\n"
    "        lock = FolderLock(folder)\n"
    "    except UserError:\n"
    "        continue\n"
    "    with open(log, 'a') as f:\n"
    "        f.write(f'in {os.getpid()}\\n'); f.flush(); time.sleep(0.002)\n"
    "        f.write(f'out {os.getpid()}\\n')\n"
    "    lock.release()\n"
    "    rounds -= 1\n"
)


# docs/reliability.md quotes a run with 4 contenders of 500 rounds each.
CONTENDERS, ROUNDS = 3, 25


def test_contending_processes_never_hold_one_folder_at_once(tmp_path):
    # Each release deletes the lock file and the folder the lock made, while others open them.
    log, shared = tmp_path / "log", tmp_path / "shared"
    procs = [
        subprocess.Popen([sys.executable, "-c", CONTENDER, shared, log, str(ROUNDS)])
        for _ in range(CONTENDERS)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0] * CONTENDERS
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * CONTENDERS * ROUNDS
    for enter, leave in zip(lines[::2], lines[1::2]):  # never two holders between in and out
        assert enter.startswith("in ") and leave == "out " + enter[3:]
    assert not (tmp_path / "shared" / LOCK_FILE).exists()


# -- the commands --------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_into_a_held_folder_is_refused_before_reading_data(tmp_path):
    # The data folder is empty: a run that read it would fail with "not found" instead.
    argv = ["--model", "tiny_mlp", "--dataset", "cifar10", "--data-dir", tmp_path / "empty",
            "--no-download", "--set", "device=cpu", "--out", "run"]  # fmt: skip
    (tmp_path / "empty").mkdir()
    with holder(tmp_path / "run") as proc:
        before = files(tmp_path)
        done = subprocess.run([sys.executable, "-m", "qtrain", "train", *map(str, argv)],
                              cwd=tmp_path, capture_output=True, text=True,
                              timeout=START_LIMIT_S)  # fmt: skip
        assert files(tmp_path) == before
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(refusal(Path("run"), proc.pid))
    assert line.endswith("); wait for it to finish or choose another --out folder")


@pytest.mark.slow
def test_a_training_run_holds_its_folder_until_it_dies(tmp_path, capsys):
    run = tmp_path / "run"
    train = ["train", *TINY, "--out", run]
    first = subprocess.Popen([sys.executable, "-c", TRAIN_THEN_HOLD, *map(str, train)])
    try:
        wait_for(run / rundir.METRICS, first)  # epoch 1 is written; it sleeps, mid-run
        lock = (run / LOCK_FILE).read_text()
        assert lock.startswith(f"{first.pid}\nqtrain train --model tiny_mlp ")
        before = files(run)
        for argv in (
            train,  # the same command a second later
            [*train, "--resume"],
            ["export", run, "--format", "packed", "--out", run / "model.safetensors"],
            ["report", run, "--out", run],
        ):
            code, out, err = cli(argv, capsys)
            assert code == 2 and out == "", err
            (line,) = err.splitlines()
            assert line.startswith(refusal(run, first.pid)), line
        assert files(run) == before
    finally:
        first.kill()
        first.wait()
    # The killed run's lock file is left behind and blocks nothing: the run continues.
    assert (run / LOCK_FILE).read_text() == lock
    assert cli([*train, "--resume"], capsys)[0] == 0
    assert len(rundir.read_metrics(run)) == 2 and not (run / LOCK_FILE).exists()


def tiny_config(**changes) -> RunConfig:
    values = dict(model="tiny_mlp", dataset="synthetic", batch_size=64, epochs=1, device="cpu",
                  channels_last=False)  # fmt: skip
    return RunConfig(**{**values, **changes})


def quiet(*_args, **_kwargs):
    pass


def test_trainers_lock_their_own_folders_only(tmp_path):
    held = Trainer(tiny_config(), tmp_path / "a", log=quiet)  # built, not run yet
    assert Trainer(tiny_config(), tmp_path / "b", log=quiet).run()  # another folder trains
    mine = re.escape(f"{tmp_path / 'a'} is in use by process {os.getpid()} (")
    with pytest.raises(UserError, match=f"^{mine}"):
        Trainer(tiny_config(), tmp_path / "a", log=quiet)
    assert held.run()  # run() releases the lock at its end
    never_run = Trainer(tiny_config(), tmp_path / "a", log=quiet)
    never_run.close()
    # A Trainer that fails while it loads its data lets go of the folder and leaves none.
    missing = tiny_config(dataset="cifar10", data_dir=str(tmp_path / "none"), download=False)
    with pytest.raises(FileNotFoundError):
        Trainer(missing, tmp_path / "c", log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert not list(tmp_path.rglob(LOCK_FILE))


@pytest.mark.parametrize(
    ("argv", "cell"),
    [
        (
            ["reproduce", "methods", "--budget", "smoke", "--seeds", "1"],
            Path("methods-smoke", comparison.cells("smoke", 1)[0].path),
        ),
        (["speedrun", "--budget", "smoke", "--seed", "0"], Path("speedrun-smoke/binary/seed0")),
    ],
    ids=["reproduce", "speedrun"],
)
def test_an_experiment_whose_cell_is_held_is_refused(tmp_path, capsys, argv, cell):
    folder = tmp_path / cell
    with holder(folder) as proc:
        code, _, err = cli([*argv, "--out", tmp_path], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(refusal(folder, proc.pid)), line
    # The refused run wrote the cell's label (atomically, the same content), nothing else.
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "label.json"]


# -- torchrun ------------------------------------------------------------------------------------


def worker_pids(agent: int) -> list[int]:
    """Processes whose parent is `agent` (torchrun starts each worker in a session of its own,
    so killing the agent's process group would leave them running)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == agent:
            pids.append(int(stat.parent.name))
    return pids


def rank_of(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"RANK="))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, port: int) -> dict:
    """What torchrun sets for rank `rank` of 2 on one machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc (Linux)")
def test_under_torchrun_rank_zero_holds_the_folder_and_every_rank_of_another_job_stops(tmp_path):
    run = tmp_path / "run"
    args = ["train", *dist_worker.CLI_ARGS, "--epochs", "2", "--out", str(run)]
    first = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "--no-python", sys.executable, "-c", TRAIN_THEN_HOLD, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    ranks = []
    try:
        wait_for(run / rundir.METRICS, first)  # both ranks trained epoch 1: rank 1 took no lock
        pid = int((run / LOCK_FILE).read_text().split()[0])
        assert pid in worker_pids(first.pid) and rank_of(pid) == "0"
        # A second 2-rank job into the folder, its ranks started as torchrun starts them but
        # without torchrun's agent, which would stop rank 1 as soon as rank 0 exits.
        port = free_port()
        ranks += [
            subprocess.Popen([sys.executable, "-m", "qtrain", *args], env=rank_env(rank, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(2)
        ]  # fmt: skip
        second = [(*proc.communicate(timeout=START_LIMIT_S), proc.returncode) for proc in ranks]
    finally:
        for worker in worker_pids(first.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        for proc in [first, *ranks]:
            proc.kill()
            proc.wait()
    for out, err, code in second:  # rank 1 stops with rank 0's refusal instead of waiting
        assert code == 2 and out == "", err
        (line,) = [x for x in err.splitlines() if x.startswith("qtrain: error:")]
        assert line.startswith(refusal(run, pid)), err
