"""``python -m coordinator``: the command line (see ``coordinator --help``)."""

import sys

from .cli import main

sys.exit(main())
