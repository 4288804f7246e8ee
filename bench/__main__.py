"""``python -m bench --help``: see :mod:`bench.runner`."""

import sys

from .runner import main

sys.exit(main())
