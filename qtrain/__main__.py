"""`python -m qtrain` (and `torchrun -m qtrain train ...`) runs the command line.

A rank of a distributed job (WORLD_SIZE > 1) leaves with `os._exit` once its output is
flushed: its files are closed and its process group destroyed by then, and the interpreter's
own teardown could abort it ("terminate called without an active exception", SIGABRT) on a
thread of the communication backend, turning a finished run or a one-line refusal into a crash.
"""

import os
import sys

from qtrain.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
