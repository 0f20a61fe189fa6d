"""Running one fuzzed case: the command line in-process under a time limit, and its verdict.

A case ends in one of these outcomes (the first three are allowed, the rest are failures):

    same             accepted, and the result is the unmutated file's, number for number
    read             accepted, and the result is exactly what the changed file says (only
                     for files without a checksum: a config value, a metrics record, pixels,
                     text; each kind says how "what it says" is found independently)
    refused          exit 2 with exactly one stderr line "qtrain: error: ..." (a library
                     call: a user error, the exceptions the CLI turns into that line)
    traceback        any other exit or exception: an internal error
    silent           accepted with a result that is neither the original one nor what the
                     changed file says: a changed number accepted without a word
    wrongly refused  refused although the file is well formed (kinds that can tell)
    hang             ran past the case's time limit

The time limit is a SIGALRM timer in this process; it interrupts Python code, not one
long-running C call (no such call is long on these tiny files).
"""

from __future__ import annotations

import contextlib
import io
import math
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from qtrain.cli import _one_line, _user_error_types, main

OUTCOMES = ("same", "read", "refused", "traceback", "silent", "wrongly refused", "hang")
ALLOWED = ("same", "read", "refused")
TIME_LIMIT_S = 60.0


@dataclass(frozen=True)
class Verdict:
    outcome: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ALLOWED


class CaseTimeout(BaseException):
    """A case ran past its time limit (not an Exception, so no `except Exception` eats it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class CliResult:
    code: int | None  # None: ran past the time limit
    out: str
    err: str


def run_cli(*argv, timeout: float = TIME_LIMIT_S) -> CliResult:
    """`qtrain ARGV` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            with time_limit(timeout):
                code = main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except CaseTimeout:
            code = None
        except KeyboardInterrupt:
            raise
        except BaseException:  # escaped main(): the user would see a traceback
            traceback.print_exc()
            code = 1
    return CliResult(code, out.getvalue(), err.getvalue())


def cli_verdict(result: CliResult, accepted: Callable[[CliResult], Verdict]) -> Verdict:
    """Refused (one line, exit 2), hang, traceback, or what `accepted` says of an exit 0."""
    if result.code is None:
        return Verdict("hang", f"no exit after {TIME_LIMIT_S:g} s")
    if result.code == 2:
        lines = result.err.splitlines()
        if (
            len(lines) == 1
            and lines[0].startswith("qtrain: error: ")
            and "Traceback (most recent call last)" not in lines[0]
        ):
            return Verdict("refused", lines[0])
        return Verdict("traceback", f"exit 2 with {len(lines)} stderr lines:\n{result.err[-4000:]}")
    if result.code == 0:
        return accepted(result)
    return Verdict("traceback", f"exit {result.code}:\n{result.err[-4000:]}")


@dataclass(frozen=True)
class Call:
    """What a library call did: "ok" with its value, "refused", "traceback" or "hang"."""

    status: str
    value: object = None
    message: str = ""


def call_reader(function: Callable[[], object], timeout: float = TIME_LIMIT_S) -> Call:
    """Run a reader; an error the CLI reports in one line is "refused" (its line kept)."""
    try:
        with time_limit(timeout):
            return Call("ok", function())
    except CaseTimeout:
        return Call("hang", message=f"no return after {timeout:g} s")
    except _user_error_types() as error:
        return Call("refused", message="qtrain: error: " + _one_line(error))
    except Exception:
        return Call("traceback", message=traceback.format_exc()[-4000:])


def call_verdict(call: Call, accepted: Callable[[object], Verdict]) -> Verdict:
    if call.status == "ok":
        return accepted(call.value)
    if call.status == "refused":
        return Verdict("refused", call.message)
    return Verdict(call.status, call.message)


def same_value(a, b) -> bool:
    """Equal, with NaN equal to NaN and a bool never equal to a number (recursively)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return (
        type(a) is type(b)
        and a == b
        or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)
    )
