"""``python -m kforcing_dist`` (and ``torchrun -m kforcing_dist``) runs the CLI."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
