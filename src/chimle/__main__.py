"""`python -m chimle ...` (and `torchrun -m chimle train ...`) run the command line."""

import sys

from chimle.cli import main

sys.exit(main())
