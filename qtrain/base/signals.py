"""Stop requests by signal: SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption notice)
become a request that the training loop acts on after the current step (checkpoint, then
stop), instead of killing the process mid-write.

A Ctrl-C at a terminal reaches the whole process group, so a child process working for the
run (the C++ compiler that `torch.compile` starts) dies of it while the run itself only
records the request; `stop_requested` lets whoever sees that child fail tell the two apart.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

_received: int | None = None  # the signal the running `stop_requests` block has received


def stop_requested() -> bool:
    """Whether SIGINT or SIGTERM has arrived while a `stop_requests` block runs."""
    return _received is not None


@contextlib.contextmanager
def stop_requests(request: Callable[[int], None]):
    """While the block runs, SIGINT and SIGTERM call `request(signum)`; the previous handlers
    are put back after it. Off the main thread signals stay the caller's to handle."""
    global _received

    def handler(signum, _frame):
        global _received
        _received = signum
        request(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signal handling to the caller
        previous = {}
    received_before, _received = _received, None
    try:
        yield
    finally:
        _received = received_before
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
