"""How often a finished rank aborts at exit under torchrun: `python -m qtrain` against a plain exit.

    python benchmarks/soak_torchrun_exit.py [--rounds 20] [--seed 0]

Each round launches `torchrun --standalone --nproc-per-node=2` twice, on the same short job
(`train` of tiny_cnn on synthetic data, one epoch, 2 CPU processes over gloo, one thread
each), in alternating order:

- "qtrain": `-m qtrain`, which ends a rank of a distributed job with `os._exit` after
  flushing its output (`qtrain/__main__.py`);
- "plain": a script that calls the same `qtrain.cli.main()` and returns its code through
  `sys.exit`, so that the interpreter's teardown runs as in any Python program.

A launch fails when torchrun exits non-zero or a rank's output holds "terminate called"
(the C++ runtime's abort, SIGABRT, seen at a rank's exit after its work was done). The
script prints each failure's last lines and, for each variant, the failures out of the
launches. Run it with nothing else on the machine; each launch takes a few seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

PLAIN_EXIT = textwrap.dedent(
    """
    import sys
    from qtrain.cli import main
    sys.exit(main())
    """
)

JOB = [
    "train", "--model", "tiny_cnn", "--dataset", "synthetic", "--method", "bc-adam",
    "--epochs", "1", "--batch-size", "32", "--set", "threads=1", "--set", "device=cpu",
]  # fmt: skip


def launch(target: list[str], seed: int, out: Path) -> subprocess.CompletedProcess:
    """torchrun of `target` (`-m qtrain` or a script) on JOB with `seed` into `out`."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command = [*launcher, *target, *JOB, "--seed", str(seed), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def failed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode != 0 or "terminate called" in done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="launches of each variant")
    parser.add_argument("--seed", type=int, default=0, help="the job's seed")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    failures = {"qtrain": 0, "plain": 0}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "plain_exit.py"
        script.write_text(PLAIN_EXIT)
        targets = {"qtrain": ["-m", "qtrain"], "plain": [str(script)]}
        for round_ in range(args.rounds):
            order = ("qtrain", "plain") if round_ % 2 == 0 else ("plain", "qtrain")
            for name in order:
                out = Path(tmp) / f"{name}-{round_}"
                done = launch(targets[name], args.seed, out)
                if failed(done):
                    failures[name] += 1
                    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
                    print(f"round {round_} {name}: exit {done.returncode}: " + " | ".join(tail))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    for name, count in failures.items():
        print(f"{name}: {count} of {args.rounds} launches failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
