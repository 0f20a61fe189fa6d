"""`python -m qtrain` (and `torchrun -m qtrain train ...`) runs the command line."""

import sys

from qtrain.cli import main

sys.exit(main())
