"""Kill-and-resume soak: real `qtrain` commands under SIGKILL and SIGTERM, checked bit for bit.

Each round picks a job, starts it as `python -m qtrain ...`, and may send it SIGKILL or
SIGTERM (to its whole process group) at a random moment; then it runs the job's resume
command until one attempt exits 0, each resume again signalled with some probability, at most
`--max-kills` times per round. The result is compared with that of an uninterrupted
reference run of the same job, made once at the start. Jobs:

    train:bc-adam, train:sr-adam   tiny_cnn on synthetic data, a checkpoint every 3 steps;
                                   resumed with --resume
    speedrun                       `speedrun --budget smoke`, a checkpoint after every step;
                                   resumed by running it again
    reproduce                      `reproduce methods --budget smoke` (12 cells); likewise
    export                         `export REF --format packed` of the reference BC run
    report                         `report` of the two reference train runs

Compared with the reference: for train, speedrun and reproduce, every run folder's
metrics.jsonl and summary.json, its checkpoint (model weights bit for bit, and the whole
training state: optimizer, schedule, generators, progress) and the experiment's table.json;
for export the packed file's bytes; for report its table.json. Wall-clock fields (`seconds`,
`minutes`, per-second rates, times to an accuracy, the minutes of a speedrun curve) and
measured memory peaks differ between any two runs and are left out. No `.*.tmp` may be left.

Random choices come from `numpy.random.default_rng(--seed)`: the job, whether an attempt is
signalled, which signal, and when: uniform up to --max-delay seconds, by default up to the
job's measured reference time, so start-up, training, evaluation and the final writes are
all in reach; for half of the signals (--aimed-share) uniform between the reference's first
write into its folder and its end, since starting Python and importing torch takes most of
a short job's time. Every child runs with one intra-op thread on the CPU, so results are
deterministic. Expected exit codes of a signalled attempt: 0 (it finished first), -9 for
SIGKILL, 143 for SIGTERM inside a training loop (a checkpoint saved) and -15 for SIGTERM
outside one (start-up, between the cells of an experiment, export, report, after the last
write). Any other code, or a non-zero code from an attempt left alone, is counted as
unexpected. A signal counts as mid-run when the attempt had already written a file into its
folder (a checkpoint, a record, an output) when it was sent. The soak exits 1 on any
mismatch, unexpected code, unfinished round or process left behind; each attempt's output is
kept in OUT/logs, and the folders of a failing round in OUT/rounds.

Run:  python benchmarks/soak.py --rounds 40 --seed 0 --out /tmp/soak [--max-minutes 13]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import qtrain
from qtrain.train import rundir
from qtrain.train.checkpoint import load_checkpoint

try:  # what two runs of one config may differ in (seconds, rates, memory peaks)
    from qtrain.train.records import MEASURED_KEYS
except ImportError:  # a qtrain from before the list
    MEASURED_KEYS = frozenset({"seconds", "images_per_second", "tokens_per_second"})

MACHINE = ["--set", "device=cpu", "--set", "threads=1"]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
EXPECTED = {signal.SIGKILL: {0, -signal.SIGKILL}, signal.SIGTERM: {0, 143, -signal.SIGTERM}}
WATCH_POLL_S = 0.05
TERM_GRACE_S = 120.0  # a SIGTERMed run finishes its step and saves; never near this long
MAX_LISTED = 5  # differences shown per round


# -- the jobs ---------------------------------------------------------------------------------
def train_argv(method: str) -> Callable:
    def argv(work: Path, resume: bool, refs: dict) -> list[str]:
        return ["train", "--model", "tiny_cnn", "--dataset", "synthetic", "--epochs", "12",
                "--batch-size", "64", "--method", method, *MACHINE,
                "--set", "checkpoint_every_steps=3", "--out", str(work / "run"),
                *(["--resume"] if resume else [])]  # fmt: skip

    return argv


def speedrun_argv(work: Path, resume: bool, refs: dict) -> list[str]:
    return ["speedrun", "--budget", "smoke", *MACHINE, "--set", "checkpoint_every_steps=1",
            "--out", str(work)]  # fmt: skip


def reproduce_argv(work: Path, resume: bool, refs: dict) -> list[str]:
    return ["reproduce", "methods", "--budget", "smoke", "--out", str(work)]


def export_argv(work: Path, resume: bool, refs: dict) -> list[str]:
    source = refs["train:bc-adam"] / "run"
    return ["export", str(source), "--format", "packed", "--out", str(work / "model.safetensors")]


def report_argv(work: Path, resume: bool, refs: dict) -> list[str]:
    runs = [str(refs[f"train:{m}"] / "run") for m in ("bc-adam", "sr-adam")]
    return ["report", *runs, "--out", str(work / "report")]


@dataclass(frozen=True)
class Job:
    """A command to soak: its argv in a work folder, how its output is compared with the
    reference's (a list of differences), and the jobs whose reference output it reads."""

    name: str
    argv: Callable[[Path, bool, dict], list[str]]
    compare: Callable[[Path, Path], list[str]]
    needs: tuple[str, ...] = ()


# -- comparison ---------------------------------------------------------------------------------
def is_timing(key) -> bool:
    """Keys measured by the machine (clock, memory): they differ between any two runs. A
    record's are qtrain's own list; the experiments' tables add minutes."""
    return isinstance(key, str) and (
        key in MEASURED_KEYS or key == "minutes" or key.startswith("minutes_to_")
    )


def untimed(value):
    """`value` without its timing entries; a speedrun curve keeps its accuracies only."""
    if isinstance(value, dict):
        return {
            k: [p[1] for p in v] if k == "curve" else untimed(v)
            for k, v in value.items()
            if not is_timing(k)
        }
    if isinstance(value, (list, tuple)):
        return [untimed(v) for v in value]
    return value


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` (so -0.0 differs from 0.0, and NaNs are compared by payload)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def differences(a, b, where: str = "") -> list[str]:
    """Where `a` and `b` differ: structure, plain values, tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(bits(a), bits(b))
        )
        return [] if same else [f"tensor {where} differs"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())} in one only"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries, reference {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}/{i}")]
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return [] if a == b or both_nan else [f"{where}: {a!r}, reference {b!r}"]


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def compare_run(got: Path, want: Path) -> list[str]:
    """One run folder against the reference's: records, summary and checkpoint."""
    found = differences(
        untimed(rundir.read_metrics(got)), untimed(rundir.read_metrics(want)), rundir.METRICS
    )
    found += differences(
        untimed(read_json(got / rundir.SUMMARY)),
        untimed(read_json(want / rundir.SUMMARY)),
        rundir.SUMMARY,
    )
    if not (got / rundir.CHECKPOINT).exists():
        return [*found, f"{got} has no {rundir.CHECKPOINT}"]
    a, b = load_checkpoint(got), load_checkpoint(want)
    found += differences(a["model_state"], b["model_state"], "model_state")
    found += differences(untimed(a["training"]), untimed(b["training"]), "training")
    return found + differences(a["config"], b["config"], "config")


def run_folders(folder: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(folder)) for p in folder.rglob(rundir.CONFIG))


def compare_experiment(got: Path, want: Path) -> list[str]:
    """Every run folder below `got` against the reference's, and the tables."""
    found = differences(run_folders(got), run_folders(want), "run folders")
    for name in run_folders(want) if not found else []:
        found += [f"{name}: {d}" for d in compare_run(got / name, want / name)]
    for table in sorted(p.relative_to(want) for p in want.rglob("table.json")):
        found += differences(
            untimed(read_json(got / table)), untimed(read_json(want / table)), str(table)
        )
    return found


def compare_bytes(name: str) -> Callable[[Path, Path], list[str]]:
    def compare(got: Path, want: Path) -> list[str]:
        a, b = got / name, want / name
        if not a.exists():
            return [f"{name} is missing"]
        return [] if a.read_bytes() == b.read_bytes() else [f"{name}: bytes differ"]

    return compare


def compare_report(got: Path, want: Path) -> list[str]:
    table = Path("report") / "table.json"
    return differences(untimed(read_json(got / table)), untimed(read_json(want / table)), "report")


JOBS = {
    job.name: job
    for job in (
        Job("train:bc-adam", train_argv("bc-adam"), lambda a, b: compare_run(a / "run", b / "run")),
        Job("train:sr-adam", train_argv("sr-adam"), lambda a, b: compare_run(a / "run", b / "run")),
        Job("speedrun", speedrun_argv, compare_experiment),
        Job("reproduce", reproduce_argv, compare_experiment),
        Job("export", export_argv, compare_bytes("model.safetensors"), ("train:bc-adam",)),
        Job("report", report_argv, compare_report, ("train:bc-adam", "train:sr-adam")),
    )
}


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp"))


# -- processes ----------------------------------------------------------------------------------
LIVE: dict[int, subprocess.Popen] = {}  # process group id -> its leader, while it runs


def kill_live() -> None:
    """SIGKILL every process group still running (on any way out of the soak)."""
    for pgid, process in list(LIVE.items()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        process.wait()
        LIVE.pop(pgid, None)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wrote_since(folder: Path, begun: float, log: Path) -> bool:
    """Whether a file below `folder` (the log aside) was written after `begun` (time.time())."""
    for path in folder.rglob("*"):
        try:
            if path != log and path.is_file() and path.stat().st_mtime >= begun:
                return True
        except FileNotFoundError:  # a temporary renamed meanwhile
            continue
    return False


@dataclass
class Attempt:
    code: int
    seconds: float
    signal: int | None = None
    mid_run: bool = False  # the job had written into its folder when the signal was sent
    first_write: float | None = None  # seconds to its first write (when watched)
    after_signal: float = 0.0  # seconds from the signal to the exit
    hung: bool = False  # did not exit within the grace after SIGTERM (then SIGKILLed)
    leftovers: bool = False  # processes of its group outlived it


def run_attempt(
    argv: list[str],
    log: Path,
    limit: float,
    kill: tuple[int, float] | None = None,
    watch: bool = False,
) -> Attempt:
    """`python -m qtrain argv` in a new process group, signalled after `kill` = (signal,
    seconds) if given; output appended to `log`. With `watch`, notes when it first wrote a
    file into the log's folder."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    started, begun = time.perf_counter(), time.time()
    with open(log, "a") as out:
        out.write(f"$ qtrain {' '.join(argv)}  (signal: {kill})\n")
        out.flush()
        process = subprocess.Popen(
            [sys.executable, "-m", "qtrain", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,  # not the checkout: PYTHONPATH may point at another qtrain
            start_new_session=True,
        )
    LIVE[process.pid] = process
    attempt = Attempt(code=0, seconds=0.0)
    try:
        if kill is not None:
            try:
                process.wait(timeout=kill[1])
            except subprocess.TimeoutExpired:
                attempt.mid_run = wrote_since(log.parent, begun, log)
                os.killpg(process.pid, kill[0])
                attempt.signal = kill[0]
                attempt.after_signal = time.perf_counter()
                limit = time.perf_counter() - started + TERM_GRACE_S
        while watch and process.poll() is None and time.perf_counter() - started < limit:
            if wrote_since(log.parent, begun, log):
                attempt.first_write = time.perf_counter() - started
                break
            time.sleep(WATCH_POLL_S)
        try:
            process.wait(timeout=max(limit - (time.perf_counter() - started), 1.0))
        except subprocess.TimeoutExpired:
            attempt.hung = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    finally:
        if process.poll() is None:  # the soak itself is stopping (a signal, Ctrl-C)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        LIVE.pop(process.pid, None)
    attempt.code, attempt.seconds = process.returncode, time.perf_counter() - started
    if attempt.signal is not None:
        attempt.after_signal = time.perf_counter() - attempt.after_signal
    if group_alive(process.pid):
        attempt.leftovers = True
        os.killpg(process.pid, signal.SIGKILL)
    return attempt


# -- rounds -------------------------------------------------------------------------------------
@dataclass
class Tally:
    rounds: int = 0
    attempts: int = 0
    resumes: int = 0
    codes: Counter = field(default_factory=Counter)  # (signal name, exit code) of signalled
    mid_run: int = 0  # signals sent after the attempt had written into its folder
    mismatches: int = 0
    unexpected: int = 0
    unfinished: int = 0
    leftovers: int = 0
    seconds: float = 0.0

    def add(self, other: Tally) -> None:
        for name in ("rounds", "attempts", "resumes", "mid_run", "mismatches", "unexpected",
                     "unfinished", "leftovers", "seconds"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.codes.update(other.codes)

    def kills(self, sig: str) -> int:
        return sum(n for (name, _), n in self.codes.items() if name == sig)


@dataclass
class Settings:
    kill_prob: float
    resume_kill_prob: float
    sigkill_share: float
    max_delay: float | None
    max_kills: int
    aimed_share: float


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of a job: its folder, wall time and time to its first write."""

    folder: Path
    seconds: float
    first_write: float

    def draw_delay(self, rng, s: Settings) -> float:
        """When to signal: any time up to the end (or --max-delay), or for `aimed_share` of
        the signals a time after start-up, between the first write and the end."""
        aimed, end = rng.random() < s.aimed_share, s.max_delay or self.seconds
        return float(rng.uniform(min(self.first_write, end) if aimed else 0.0, end))


def soak_round(job: Job, work: Path, refs: dict[str, Reference], rng, s: Settings):
    """Run `job` in `work` under signals until an attempt finishes; (tally, events, found)."""
    tally, events, log = Tally(rounds=1), [], work / "qtrain.log"
    work.mkdir(parents=True)
    folders, reference = {n: r.folder for n, r in refs.items()}, refs[job.name]
    limit = 60.0 + 10.0 * reference.seconds
    kills = 0
    while True:
        resume = tally.attempts > 0
        draw, pick, delay = rng.random(), rng.random(), reference.draw_delay(rng, s)
        p = s.resume_kill_prob if resume else s.kill_prob
        sig = signal.SIGKILL if pick < s.sigkill_share else signal.SIGTERM
        kill = (sig, delay) if kills < s.max_kills and draw < p else None
        attempt = run_attempt(job.argv(work, resume, folders), log, limit, kill)
        tally.attempts += 1
        tally.resumes += resume
        tally.leftovers += attempt.leftovers
        if attempt.signal is not None:
            kills += 1
            name = signal.Signals(attempt.signal).name
            tally.codes[(name, attempt.code)] += 1
            tally.mid_run += attempt.mid_run
            where = "mid-run" if attempt.mid_run else "before any write"
            events.append(f"{name} at {delay:.2f}s, {where} ({attempt.code} "
                          f"{attempt.after_signal:.2f}s later)")  # fmt: skip
            if attempt.code not in EXPECTED[attempt.signal] or attempt.hung:
                tally.unexpected += 1
                events[-1] += " UNEXPECTED"
            if attempt.code == 0:
                break
            continue
        events.append(f"ran ({attempt.code})")
        if attempt.code != 0 or attempt.hung:
            tally.unexpected += 1
            tally.unfinished += 1
            return tally, events, [f"an attempt left alone exited {attempt.code}; see {log}"]
        break
    found = job.compare(work, reference.folder)
    found += [f"temporary left behind: {t}" for t in temporaries(work)]
    tally.mismatches += bool(found)
    return tally, events, found


def make_references(names: list[str], out: Path) -> dict[str, Reference]:
    """Run each job (and the jobs it needs) once, uninterrupted."""
    order = []
    for name in names:
        order += [n for n in (*JOBS[name].needs, name) if n not in order]
    refs = {}
    for name in order:
        work = out / "reference" / name.replace(":", "-")
        work.mkdir(parents=True)
        folders = {n: r.folder for n, r in refs.items()}
        attempt = run_attempt(JOBS[name].argv(work, False, folders), work / "qtrain.log", 1800.0,
                              watch=True)  # fmt: skip
        if attempt.code != 0 or attempt.leftovers:
            raise SystemExit(f"soak: the reference run of {name} failed; see {work}/qtrain.log")
        refs[name] = Reference(work, attempt.seconds, attempt.first_write or 0.0)
        print(f"reference {name}: {attempt.seconds:.1f} s, first write after "
              f"{refs[name].first_write:.1f} s", flush=True)  # fmt: skip
    return refs


def table(per_job: dict[str, Tally]) -> str:
    """The result table (markdown): a row per job and the total."""
    total = Tally()
    for t in per_job.values():
        total.add(t)
    head = ("job", "rounds", "SIGKILL", "SIGTERM", "of them mid-run", "SIGTERM → 143",
            "SIGTERM → -15",
            "signalled after exit 0", "resumes", "mismatches", "unexpected codes",
            "seconds")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in [*per_job.items(), ("total", total)]:
        cells = (name, t.rounds, t.kills("SIGKILL"), t.kills("SIGTERM"), t.mid_run,
                 t.codes[("SIGTERM", 143)], t.codes[("SIGTERM", -15)],
                 t.codes[("SIGKILL", 0)] + t.codes[("SIGTERM", 0)], t.resumes, t.mismatches,
                 t.unexpected, f"{t.seconds:.0f}")  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=40, help="rounds (default 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")
    p.add_argument("--out", type=Path, required=True, help="work folder (emptied first)")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {list(JOBS)}")
    p.add_argument("--kill-prob", type=float, default=0.9,
                   help="chance that a round's first attempt is signalled (0.9)")  # fmt: skip
    p.add_argument("--resume-kill-prob", type=float, default=0.5,
                   help="chance that a resume is signalled again (0.5)")  # fmt: skip
    p.add_argument("--sigkill-share", type=float, default=0.5,
                   help="share of signals that are SIGKILL; the rest SIGTERM (0.5)")  # fmt: skip
    p.add_argument("--max-delay", type=float, default=None,
                   help="latest signal, seconds after the start (default: the job's "
                   "reference time)")  # fmt: skip
    p.add_argument("--aimed-share", type=float, default=0.5,
                   help="share of signals sent after start-up: between the reference's first "
                   "write and its end (0.5)")  # fmt: skip
    p.add_argument("--max-kills", type=int, default=4, help="signals per round at most (4)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no round after this many minutes")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the folders of passing rounds")
    args = p.parse_args(argv)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    unknown = [j for j in args.jobs if j not in JOBS]
    if unknown or not args.jobs:
        p.error(f"unknown jobs {unknown}; choose from {list(JOBS)}")
    return args


def soak(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    print(f"qtrain {qtrain.__version__} from {Path(qtrain.__file__).parent}", flush=True)
    refs = make_references(args.jobs, args.out)
    rng = np.random.default_rng(args.seed)
    settings = Settings(args.kill_prob, args.resume_kill_prob, args.sigkill_share,
                        args.max_delay, args.max_kills, args.aimed_share)  # fmt: skip
    per_job = {name: Tally() for name in args.jobs}
    failures = []
    for number in range(1, args.rounds + 1):
        if args.max_minutes and time.perf_counter() - started > 60.0 * args.max_minutes:
            print(f"stopping after {number - 1} rounds: --max-minutes {args.max_minutes} passed")
            break
        name = args.jobs[int(rng.integers(len(args.jobs)))]
        work = args.out / "rounds" / f"{number:03d}-{name.replace(':', '-')}"
        began = time.perf_counter()
        tally, events, found = soak_round(JOBS[name], work, refs, rng, settings)
        tally.seconds = time.perf_counter() - began
        per_job[name].add(tally)
        verdict = "identical" if not found else "MISMATCH"
        print(f"round {number}/{args.rounds} {name}: {', '.join(events)}; {verdict}", flush=True)
        if found or tally.unexpected or tally.leftovers:
            failures.append((number, name, found, work))
            for line in found[:MAX_LISTED]:
                print(f"    {line}")
        elif not args.keep:
            # the log of every attempt stays (small), the outputs of a passing round go
            (args.out / "logs").mkdir(exist_ok=True)
            shutil.move(work / "qtrain.log", args.out / "logs" / f"{work.name}.log")
            shutil.rmtree(work)
    result = table(per_job)
    total = Tally()
    for t in per_job.values():
        total.add(t)
    print()
    print(result)
    print(f"\n{total.rounds} rounds, {total.kills('SIGKILL')} SIGKILL + {total.kills('SIGTERM')} "
          f"SIGTERM, {total.resumes} resumes, {total.mismatches} mismatches, {total.unexpected} "
          f"unexpected exit codes, {total.unfinished} unfinished rounds, {total.leftovers} "
          f"process groups left behind; {time.perf_counter() - started:.0f} s")  # fmt: skip
    summary = {"args": {k: str(v) for k, v in vars(args).items()},
               "references": {n: {"seconds": r.seconds, "first_write": r.first_write}
                              for n, r in refs.items()},
               "jobs": {n: {**vars(t), "codes": {f"{s} {c}": k for (s, c), k in t.codes.items()}}
                        for n, t in per_job.items()},
               "failures": [{"round": r, "job": n, "differences": f, "folder": str(w)}
                            for r, n, f, w in failures]}  # fmt: skip
    (args.out / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failures or total.unfinished else 0


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    atexit.register(kill_live)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        return soak(args)
    finally:
        kill_live()


if __name__ == "__main__":
    sys.exit(main())
