"""``python -m ppfast.tools.demo ARGS...``, the same as ``ppfast demo ARGS...``."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
