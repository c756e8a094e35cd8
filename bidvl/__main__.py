"""`python -m bidvl COMMAND ...` (and `accelerate launch -m bidvl train ...`): see bidvl.cli."""

import sys

from bidvl.cli import main

if __name__ == "__main__":
    sys.exit(main())
