"""``python -m invariance``: the command line (same as the ``invariance`` command)."""

import sys

from ._cli import main

sys.exit(main())
