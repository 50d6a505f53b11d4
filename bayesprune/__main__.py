"""``python -m bayesprune``: the command line, as launchers run it (``torchrun -m bayesprune fit ...``)."""

import sys

from .run.cli import main

sys.exit(main())
