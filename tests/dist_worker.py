"""One rank of the distributed tests in test_distributed.py (a script, not a test module).

    python tests/dist_worker.py JOB OUT

runs as one process per rank, with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set by the test or by torchrun. Jobs:

    checks  trainer-level runs on 2 ranks (and single-process references on rank 0); each
            rank trains into OUT/rank<r>/<run> and saves what it holds after each run to
            OUT/results/<run>-rank<r>.pt: model state, optimizer state, metrics. Then, in a
            new process group on HANG_PORT, the `hang` job in OUT/hang: starting Python
            and torch costs more than everything else, so one launch serves both.
    die     `qtrain train` (CLI_ARGS, --out OUT/run) in which rank 1 exits with code 3 at
            its third step, as a crashed worker does
    hang    the same, but rank 1 stops responding at its third step (sleeps for a minute):
            rank 0 exits with code 2 after --dist-timeout and the roll call

Every rank of `checks` passes its own folder as the run folder, so a file written by a rank
other than 0 would show up under OUT/rank1, and a resume that read files on rank 1 would
fail: rank 0 must read and broadcast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

WORKER = Path(__file__).resolve()
DIST_TIMEOUT_S = 60.0  # generous: rank 1 waits at barriers while rank 0 runs references
FAILURE_TIMEOUT_S = 3  # --dist-timeout of the die and hang jobs
FAILING_STEP = 3

# One quantized config shared by `checks` and the command line runs of the tests: tiny_mlp
# on the synthetic set (512 training images: 8 steps of 64 per epoch). The schedule is
# constant so that a 1-epoch run resumed with 2 epochs is the 2-epoch run.
CLI_CONFIG = dict(
    model="tiny_mlp",
    dataset="synthetic",
    method="sr-adam",
    batch_size=64,
    lr=0.05,
    schedule="constant",
    device="cpu",
    channels_last=False,
    augment=True,
    eval_batch_size=128,
    threads=1,
    # float32, so that the ranks' gradients match the whole batch's to 1e-5 (bf16 would not)
    amp="off",
)
CLI_ARGS = [
    arg
    for key, value in CLI_CONFIG.items()
    for arg in ("--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}")
]

# Quantized runs of 2 epochs whose replicas must stay bit-identical across ranks.
REPLICA_RUNS = {
    "sr-adam": dict(),  # CLI_CONFIG itself
    "bc-adam": dict(method="bc-adam"),
    "bc-adam-stochastic": dict(method="bc-adam", bc_stochastic=True),
}
BN_FREE_MODEL = "test_mlp_no_bn"
STOP_AT = 5  # the interrupted 2-rank run stops after this global step (epoch 1)
STOP_AT_SINGLE = 11  # the interrupted 1-rank run stops after this one (epoch 2, batch 3)


class MLPNoBN(nn.Module):
    """tiny_mlp without BatchNorm: average-pool to 4×4, 4×4 conv to 64, ReLU, linear."""

    def __init__(self, num_classes: int, width: float, in_channels: int) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Conv2d(in_channels, 64, 4), nn.ReLU(), nn.Flatten()
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x))


def fp_config(**changes):
    """FP-ADAM on the BatchNorm-free MLP: the math is the same for any number of ranks."""
    from qtrain.train.config import from_dict

    values = {**CLI_CONFIG, "model": BN_FREE_MODEL, "method": "fp-adam", "epochs": 2}
    return from_dict({**values, "checkpoint_every_steps": 3, **changes})


def quiet(*_args, **_kwargs):
    pass


def stop_after(trainer, step: int, when: bool = True) -> None:
    """Make `trainer` receive SIGTERM during its `step`-th optimizer step (if `when`)."""
    real_step, calls = trainer.optimizer.step, {"n": 0}

    def step_and_signal():
        calls["n"] += 1
        if when and calls["n"] == step:
            trainer._stop_signal = signal.SIGTERM  # what the installed handler does
        return real_step()

    trainer.optimizer.step = step_and_signal


def job_checks(out: Path) -> None:
    from qtrain.models import register_model
    from qtrain.train.config import from_dict
    from qtrain.train.distributed import DistributedContext
    from qtrain.train.trainer import Trainer, TrainingInterrupted

    register_model(BN_FREE_MODEL, input_size=8, dataset="synthetic")(MLPNoBN)
    dist = DistributedContext.from_env("cpu", timeout_s=DIST_TIMEOUT_S)
    single = DistributedContext.single()
    mine = out / f"rank{dist.rank}"
    (out / "results").mkdir(parents=True, exist_ok=True)

    def keep(name: str, trainer: Trainer, metrics: list[dict]) -> None:
        torch.save(
            {
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "metrics": metrics,
            },
            out / "results" / f"{name}-rank{dist.rank}.pt",
        )

    def train(name, config, context, folder=None, resume=False, stop=None, stop_here=True):
        trainer = Trainer(config, folder or mine / name, log=quiet, dist=context)
        if stop is not None:
            stop_after(trainer, stop, stop_here)
        with contextlib.suppress(TrainingInterrupted):  # the checkpoint is what counts
            keep(name, trainer, trainer.run(resume=resume))

    # SR and (stochastic) BC: every rank must end with the same bits.
    for name, changes in REPLICA_RUNS.items():
        train(name, from_dict({**CLI_CONFIG, "epochs": 2, **changes}), dist)

    # FP-ADAM: 2 ranks × 32 images against 1 rank × 64; interrupted mid-epoch on one world
    # size and resumed on the other, each way. The signal reaches rank 1 only, like a
    # SIGTERM sent to one process: both ranks must still stop after the same step.
    train("fp-2ranks", fp_config(), dist)
    train("fp-2to1", fp_config(), dist, stop=STOP_AT, stop_here=dist.rank == 1)
    if dist.is_main:
        train("fp-1rank", fp_config(), single)
        train("fp-2to1", fp_config(), single, resume=True)
        train("fp-1to2", fp_config(), single, stop=STOP_AT_SINGLE)
    dist.barrier()
    train("fp-1to2", fp_config(), dist, resume=True)

    # The command line test resumes this 1-epoch run under torchrun with 2 epochs and
    # compares with the sr-adam run above, which is CLI_CONFIG with 2 epochs.
    train("cli-resume", from_dict({**CLI_CONFIG, "epochs": 1}), dist)
    dist.close()


def wait_for_each_other(out: Path, limit_s: float = 60.0) -> None:
    """Return once both ranks got here (files in `out`), so that with a short
    --dist-timeout a slow start of one process does not time out the other's start."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ready-{os.environ['RANK']}").touch()
    deadline = time.monotonic() + limit_s
    while not all((out / f"ready-{r}").exists() for r in range(2)):
        if time.monotonic() > deadline:
            sys.exit("the other rank did not start")
        time.sleep(0.01)


def job_failing(out: Path, mode: str) -> None:
    """`qtrain train` in which rank 1 dies or stops responding at its third step."""
    from qtrain.cli import main
    from qtrain.methods.optimizer import QuantizedOptimizer

    real_step, calls = QuantizedOptimizer.step, {"n": 0}

    def failing_step(self, closure=None):
        calls["n"] += 1
        if os.environ["RANK"] == "1" and calls["n"] == FAILING_STEP:
            if mode == "die":
                os._exit(3)
            time.sleep(60)  # the test kills this process long before
        return real_step(self, closure)

    QuantizedOptimizer.step = failing_step
    wait_for_each_other(out)
    argv = ["train", *CLI_ARGS, "--epochs", "2", "--out", str(out / "run")]
    sys.exit(main([*argv, "--dist-timeout", str(FAILURE_TIMEOUT_S)]))


if __name__ == "__main__":
    torch.set_num_threads(1)
    job, folder = sys.argv[1], Path(sys.argv[2])
    if job == "checks":
        job_checks(folder)
        os.environ["MASTER_PORT"] = os.environ["HANG_PORT"]
        job_failing(folder / "hang", "hang")
    else:
        job_failing(folder, job)
