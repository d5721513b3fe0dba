"""``python -m bora`` (and ``torchrun --nproc-per-node N -m bora fit ...``): the command line."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
