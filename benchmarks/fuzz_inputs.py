"""Fuzzed inputs, the long run: hypothesis cases per file kind, counted by outcome.

Every kind of file qtrain reads (packed files, checkpoints, config.toml, the shipped presets,
metrics.jsonl, CIFAR batches, text files, ImageNet folders) is mutated by hypothesis and
read by the real command line or reader, in-process, one case at a time in a fresh folder
(tests/fuzz_kinds.py says what each kind runs and what "the same result" means for it). Each
case ends in one outcome (tests/fuzz_harness.py): same, read (a change a file without
checksum legitimately carries, read back exactly), refused with one line; or a failure:
traceback, silent accept, wrongly refused, hang. The table counts them per kind; failing
cases are printed after it with their mutation, so each can be replayed.

Run:  python benchmarks/fuzz_inputs.py [--cases 500] [--seed 0] [--kinds packed,cifar,...]

The exit code is 1 when any case failed. `tests/test_fuzz_inputs.py` is the CI-sized run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from fuzz_harness import ALLOWED, OUTCOMES  # noqa: E402
from fuzz_kinds import KINDS, Originals, run_case  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COLUMNS = {
    "same": "same result",
    "read": "read as changed",
    "refused": "refused, one line",
    "traceback": "tracebacks",
    "silent": "silent accepts",
    "wrongly refused": "wrongly refused",
    "hang": "hangs",
}


def fuzz_kind(kind, cases: int, random_seed: int) -> tuple[Counter, list, float]:
    """(outcome counts, failing (case, verdict) pairs, seconds) of `cases` cases of `kind`."""
    counts: Counter = Counter()
    failures: list = []

    @seed(random_seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data())
    def explore(data):
        case = data.draw(kind.cases())
        verdict = run_case(kind, case)
        counts[verdict.outcome] += 1
        if not verdict.ok:
            failures.append((case, verdict))

    start = time.perf_counter()
    explore()
    return counts, failures, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="cases per kind (500)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (0)")
    parser.add_argument("--kinds", default=",".join(k.name for k in KINDS),
                        help="comma-separated kinds (default: all)")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    chosen = args.kinds.split(",")
    unknown = sorted(set(chosen) - {k.name for k in KINDS})
    if unknown:
        parser.error(f"unknown kind {unknown[0]}; choose from {', '.join(k.name for k in KINDS)}")
    rows, all_failures = [], []
    with tempfile.TemporaryDirectory(prefix="qtrain-fuzz-") as folder:
        originals = Originals(Path(folder))
        for kind_class in KINDS:
            if kind_class.name not in chosen:
                continue
            kind = kind_class(originals)
            counts, failures, seconds = fuzz_kind(kind, args.cases, args.seed)
            rows.append((kind.name, counts, seconds))
            all_failures += [(kind.name, case, verdict) for case, verdict in failures]
            print(f"{kind.name}: {sum(counts.values())} cases in {seconds:.0f} s", file=sys.stderr)
    header = ["file kind", "cases", *COLUMNS.values(), "seconds"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    total: Counter = Counter()
    for name, counts, seconds in rows:
        total.update(counts)
        cells = [str(counts.get(outcome, 0)) for outcome in COLUMNS]
        print(f"| {name} | {sum(counts.values())} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    cells = [str(total.get(outcome, 0)) for outcome in COLUMNS]
    seconds = sum(s for _, _, s in rows)
    print(f"| all | {sum(total.values())} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    assert set(COLUMNS) == set(OUTCOMES)
    for name, case, verdict in all_failures:
        print(f"\n{name}: {verdict.outcome}\n  case: {case!r}\n  {verdict.detail[-1500:]}")
    return 1 if any(v.outcome not in ALLOWED for _, _, v in all_failures) else 0


if __name__ == "__main__":
    sys.exit(main())
