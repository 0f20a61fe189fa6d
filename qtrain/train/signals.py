"""Stop requests by signal: SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption notice)
become a request that the training loop acts on after the current step (checkpoint, then
stop), instead of killing the process mid-write."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable


@contextlib.contextmanager
def stop_requests(request: Callable[[int], None]):
    """While the block runs, SIGINT and SIGTERM call `request(signum)`; the previous handlers
    are put back after it. Off the main thread signals stay the caller's to handle."""

    def handler(signum, _frame):
        request(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signal handling to the caller
        previous = {}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
