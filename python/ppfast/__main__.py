"""``python -m ppfast ARGS...``: the ``ppfast`` command line."""

import sys

from .tools.cli import main

sys.exit(main())
