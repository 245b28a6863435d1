"""``python -m hetgraph`` (and ``torchrun -m hetgraph``): the command line."""

import sys

from hetgraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
