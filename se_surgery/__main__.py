"""``python -m se_surgery``: the same as the ``se-surgery`` command."""

import sys

from .cli import main

sys.exit(main())
