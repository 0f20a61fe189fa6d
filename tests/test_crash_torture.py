"""Crash torture: SIGKILL `qtrain train` at random moments, resume, demand identical results.

A pre-empted job gets no warning and no chance to save. This test kills real training
processes (see crash_harness.py) at moments drawn from a seeded numpy Generator: half at a
random time (startup, loading, training, evaluation, writing), half inside a random one of the
next few checkpoint writes. After every kill the run folder must hold either no checkpoint
or a complete one that loads (CRC-checked) and is no older than the one before; the next
attempt resumes with `--resume`. Once a chain of attempts finishes, its final weights,
optimizer state (BC's latent weights, SR's rounding generator), RNG state and metrics must
equal those of an uninterrupted run bit for bit, and no temporary file may be left behind.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from crash_harness import CrashServer

from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint
from qtrain.train.records import MEASURED_KEYS

SEED = 2017
# BC keeps latent float weights in the optimizer; SR draws its rounding from a generator.
METHODS = ("bc-adam", "sr-adam")
MIN_KILLS = 24
MIN_KILLS_IN_CHECKPOINT_WRITES = 6
MAX_CHAINS = 16  # bounds the test if kills keep missing writes
MAX_ATTEMPTS_PER_CHAIN = 60
MAX_WRITES_PER_ATTEMPT = 6  # an aimed kill lands in one of an attempt's first 6 writes
LIMIT_S = 60.0  # a single attempt never legitimately takes this long
TIMING_KEYS = MEASURED_KEYS  # what two runs of one config may differ in


def train_argv(method: str, out: Path) -> list[str]:
    # 24 steps over 3 epochs with a checkpoint after every step: writes are never far away.
    return [
        "train",
        "--model",
        "tiny_mlp",
        "--dataset",
        "synthetic",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--method",
        method,
        "--set",
        "device=cpu",
        "--set",
        "channels_last=false",
        "--set",
        "checkpoint_every_steps=1",
        "--set",
        "threads=1",
        "--resume",
        "--out",
        str(out),
    ]


@dataclass
class Tally:
    kills: int = 0
    aimed: int = 0  # of the kills, those aimed at a checkpoint write
    in_checkpoint_write: int = 0  # a .checkpoint.pt.*.tmp was left behind
    in_other_write: int = 0  # a temporary of metrics.jsonl, config.toml or meta.json
    attempts: int = 0
    chains: int = 0


def temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp")) if run_dir.exists() else []


def without_timing(value):
    """`value` with wall-clock entries removed; they are the only legitimate difference."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def assert_identical(a, b, where: str = "") -> None:
    """Equal structure, equal plain values, and tensors equal element for element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"tensor {where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def check_after_kill(run_dir: Path, last: tuple[int, int] | None) -> tuple[int, int] | None:
    """The checkpoint (if any) loads, never moves backwards, and metrics.jsonl agrees with it.

    Returns the checkpoint's (epoch, next batch).
    """
    checkpoint = run_dir / rundir.CHECKPOINT
    if not checkpoint.exists():
        assert last is None, "a checkpoint that existed disappeared"
        return None
    training = load_checkpoint(checkpoint)["training"]
    progress = (int(training["epoch"]), int(training["sums"]["batch"]))
    assert last is None or progress >= last, f"checkpoint went back from {last} to {progress}"
    saved = without_timing(training["metrics"])
    on_disk = without_timing(rundir.read_metrics(run_dir))
    # metrics.jsonl is written right after the checkpoint, so a kill between may leave it
    # one epoch behind (the next start rewrites it); it may never be ahead or different.
    assert on_disk in (saved, saved[:-1])
    return progress


def assert_same_result(run_dir: Path, reference: Path) -> None:
    got, want = load_checkpoint(run_dir), load_checkpoint(reference)
    assert_identical(got["model_state"], want["model_state"], "model_state")
    assert_identical(without_timing(got["training"]), without_timing(want["training"]), "training")
    assert without_timing(rundir.read_metrics(run_dir)) == without_timing(
        rundir.read_metrics(reference)
    )
    summaries = [json.loads((d / rundir.SUMMARY).read_text()) for d in (run_dir, reference)]
    assert without_timing(summaries[0]) == without_timing(summaries[1])
    assert temporaries(run_dir) == [], "temporaries of killed writes were not cleaned up"


def log_tail(log: Path) -> str:
    return log.read_text()[-2000:] if log.exists() else "(no output)"


def torture_chain(
    server: CrashServer,
    rng: np.random.Generator,
    method: str,
    run_dir: Path,
    log: Path,
    reference_s: float,
    tally: Tally,
) -> None:
    """Kill-and-resume `run_dir` until an attempt finishes the run."""
    progress = None
    argv = train_argv(method, run_dir)
    for _ in range(MAX_ATTEMPTS_PER_CHAIN):
        aimed = rng.random() < 0.5
        if not aimed:
            # Up to one uninterrupted run's length: startup, loading, training, evaluation and
            # the final writes are all in reach (resumed attempts start part-way).
            delay = float(rng.uniform(0.0, reference_s))
            result = server.attempt(argv, log, LIMIT_S, kill_after=delay)
        else:
            write = int(rng.integers(1, MAX_WRITES_PER_ATTEMPT + 1))
            result = server.attempt(argv, log, LIMIT_S, kill_at_write=(run_dir, write))
        tally.attempts += 1
        if result["code"] == 0:
            return
        assert result["code"] == -signal.SIGKILL, log_tail(log)
        tally.kills += 1
        tally.aimed += aimed
        left = temporaries(run_dir)
        tally.in_checkpoint_write += any(name.startswith(".checkpoint.pt.") for name in left)
        tally.in_other_write += any(not name.startswith(".checkpoint.pt.") for name in left)
        progress = check_after_kill(run_dir, progress)
    raise AssertionError(f"{run_dir} did not finish in {MAX_ATTEMPTS_PER_CHAIN} attempts")


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    rng = np.random.default_rng(SEED)
    started = time.perf_counter()
    tally = Tally()
    logs = tmp_path / "logs"
    logs.mkdir()
    with CrashServer() as server:
        reference_s = {}
        for method in METHODS:
            ref = tmp_path / f"reference-{method}"
            log = logs / f"reference-{method}.log"
            result = server.attempt(train_argv(method, ref), log, LIMIT_S)
            assert result["code"] == 0, log_tail(log)
            reference_s[method] = result["seconds"]
        while tally.kills < MIN_KILLS or tally.in_checkpoint_write < MIN_KILLS_IN_CHECKPOINT_WRITES:
            assert tally.chains < MAX_CHAINS, f"too few kills landed: {tally}"
            method = METHODS[tally.chains % len(METHODS)]
            run_dir = tmp_path / f"chain{tally.chains}-{method}"
            log = logs / f"chain{tally.chains}.log"
            torture_chain(server, rng, method, run_dir, log, reference_s[method], tally)
            assert_same_result(run_dir, tmp_path / f"reference-{method}")
            tally.chains += 1
    print(
        f"crash torture: {tally.kills} SIGKILLs ({tally.kills - tally.aimed} at random times, "
        f"{tally.aimed} aimed at writes) in {tally.attempts} attempts over {tally.chains} "
        f"runs; {tally.in_checkpoint_write} landed inside a checkpoint write, "
        f"{tally.in_other_write} inside another file's write; "
        f"{time.perf_counter() - started:.1f} s"
    )
