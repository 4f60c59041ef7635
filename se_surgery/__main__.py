"""``python -m se_surgery``: the same as the ``se-surgery`` command."""

import sys

from .cli import main

if __name__ == "__main__":  # importing this module (doctest collection, tools) must not run the CLI
    sys.exit(main())
