"""Data-parallel training on 2 CPU processes (gloo), launched as plain processes or torchrun.

The ranks run tests/dist_worker.py: one launch does every trainer-level check and leaves
its results on disk for the tests below; the command line tests launch torchrun itself.
Every launch is bounded by a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import dist_worker
import pytest
import torch

from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.config import RunConfig
from qtrain.train.distributed import DistributedContext
from qtrain.train.records import MEASURED_KEYS
from qtrain.train.trainer import Trainer

LAUNCH_TIMEOUT_S = 120
TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int | None = None) -> dict:
    """The environment of a worker: one intra-op thread (2 processes share 2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if rank is not None:
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
        )
    return env


def start_ranks(job: str, out: Path) -> list[subprocess.Popen]:
    """Start ranks 0 and 1 of dist_worker `job`; their output goes to OUT/rank<r>.log."""
    ports = {"MASTER_PORT": str(free_port()), "HANG_PORT": str(free_port())}
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(2):
        with open(out / f"rank{rank}.log", "w") as log:  # the child keeps its own copy
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(dist_worker.WORKER), job, str(out)],
                    env={**worker_env(rank), **ports},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def torchrun(*args: str, timeout: float = LAUNCH_TIMEOUT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return subprocess.run(
        [*command, "--nproc-per-node=2", *args],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def flatten(tree, prefix: str = "") -> dict:
    """Leaves of nested dicts and lists, keyed by their path."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    return {k: v for key, sub in items for k, v in flatten(sub, f"{prefix}/{key}").items()}


def assert_bit_identical(a, b) -> None:
    a, b = flatten(a), flatten(b)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def assert_close_metrics(a: list[dict], b: list[dict]) -> None:
    a, b = comparable(a), comparable(b)
    assert [m.keys() for m in a] == [m.keys() for m in b]
    for ma, mb in zip(a, b):
        # entries that are None (e.g. FP's wb_wr_gap) must match exactly; pytest.approx
        # refuses None under a relative tolerance
        assert {k for k, v in ma.items() if v is None} == {k for k, v in mb.items() if v is None}
        numbers = {k: v for k, v in mb.items() if v is not None}
        assert {k: ma[k] for k in numbers} == pytest.approx(numbers, rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> Path:
    """Folder of a finished 2-rank `checks` job (see dist_worker).

    The job ends with rank 1 hanging and rank 0 failing with exit code 2, which
    test_a_rank_that_hangs_is_named_after_the_timeout examines; rank 1 is then killed.
    """
    out = tmp_path_factory.mktemp("dist")
    rank0, rank1 = start_ranks("checks", out)
    try:
        code = rank0.wait(timeout=LAUNCH_TIMEOUT_S)
    finally:
        rank0.kill()
        rank1.kill()
        rank1.wait()
    logs = "\n".join((out / f"rank{r}.log").read_text() for r in range(2))
    assert code == 2 and (out / "hang" / "run").is_dir(), logs
    return out


def result(checks: Path, run: str, rank: int) -> dict:
    return torch.load(checks / "results" / f"{run}-rank{rank}.pt", weights_only=True)


@pytest.mark.parametrize("run", sorted(dist_worker.REPLICA_RUNS))
def test_sr_and_bc_keep_every_rank_bit_identical(checks, run):
    rank0, rank1 = result(checks, run, 0), result(checks, run, 1)
    assert len(rank0["metrics"]) == 2  # 16 steps, each rounding with the shared generator
    # weights, BatchNorm statistics, Adam moments, BC's w_r, the rounding generator's state
    assert_bit_identical(rank0["model"], rank1["model"])
    assert_bit_identical(rank0["optimizer"], rank1["optimizer"])
    assert comparable(rank0["metrics"]) == comparable(rank1["metrics"])


def test_fp_adam_on_two_ranks_matches_one_rank_with_the_whole_batch(checks):
    one = result(checks, "fp-1rank", 0)
    for rank in range(2):
        two = result(checks, "fp-2ranks", rank)
        assert_close_weights(two["model"], one["model"])
        # train metrics are summed over the ranks' shards, test metrics too
        assert_close_metrics(two["metrics"], one["metrics"])


def test_a_run_resumes_mid_epoch_on_another_number_of_ranks(checks):
    one = result(checks, "fp-1rank", 0)
    for run, ranks in (("fp-2to1", [0]), ("fp-1to2", [0, 1])):
        for rank in ranks:
            resumed = result(checks, run, rank)
            assert_close_weights(resumed["model"], one["model"])
            assert_close_metrics(resumed["metrics"], one["metrics"])
    saved = load_checkpoint(checks / "rank0" / "fp-2to1" / rundir.CHECKPOINT)
    assert saved["training"]["finished"]


def test_only_rank_zero_writes_files_and_reads_checkpoints(checks):
    # rank 1 was given its own run folders: it never created them, not even to resume
    assert not (checks / "rank1").exists()
    assert sorted(p.name for p in (checks / "rank0" / "fp-2ranks").iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "meta.json",
        "metrics.jsonl",
        "summary.json",
    ]


def test_resume_under_torchrun_continues_bit_identically(checks):
    run_dir = checks / "rank0" / "cli-resume"
    done = torchrun(
        "-m", "qtrain", "train", *dist_worker.CLI_ARGS, "--epochs", "2", "--resume",
        "--out", str(run_dir),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and done.stdout.count("finished:") == 1  # rank 0 logs
    reference = result(checks, "sr-adam", 0)  # the same configuration with 2 epochs
    resumed = load_checkpoint(run_dir / rundir.CHECKPOINT)
    assert_bit_identical(resumed["model_state"], reference["model"])
    assert comparable(rundir.read_metrics(run_dir)) == comparable(reference["metrics"])


def test_a_rank_that_dies_ends_the_run_and_is_named(tmp_path):
    done = torchrun(str(dist_worker.WORKER), "die", str(tmp_path), timeout=60)  # no hang
    output = done.stdout + done.stderr
    assert done.returncode != 0
    # torchrun's agent sees the exit, stops rank 0 and names rank 1 as the root cause
    root_cause = output[output.index("Root Cause") :]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s+exitcode\s*:\s*3", root_cause), output


def test_a_rank_that_hangs_is_named_after_the_timeout(checks):
    # rank 0 blocked in a collective until --dist-timeout, then held the roll call
    log = (checks / "rank0.log").read_text()
    (line,) = [x for x in log.splitlines() if x.startswith("qtrain: error:")]
    assert "rank 1 did not answer: it died or hangs" in line
    assert f"--dist-timeout {dist_worker.FAILURE_TIMEOUT_S} s" in line


@pytest.mark.parametrize(("key", "size"), [("batch_size", 33), ("eval_batch_size", 101)])
def test_a_global_batch_the_world_size_does_not_divide_is_refused(tmp_path, key, size):
    config = RunConfig(**{**dist_worker.CLI_CONFIG, "threads": 0, key: size})
    two_ranks = DistributedContext(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"^{key} {size} is the global batch, which 2 processes"):
        Trainer(config, tmp_path, dist=two_ranks)
    assert not tmp_path.joinpath("config.toml").exists()
