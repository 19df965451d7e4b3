"""``python -m stn``: the command line (same as the ``stn`` command)."""

import sys

from ._cli import main

sys.exit(main())
