"""Draw samples (or test reconstructions) of a run into a PNG grid and optionally a .npy file.

The same as `bidvl sample` (bidvl/cli/sample.py, where the options are documented), kept so that
`python launch/sample.py ...` and `accelerate launch launch/sample.py ...` work in a clone.
"""

import sys

from bidvl.cli import run_command


def main(argv=None) -> int:
    return run_command("sample", argv)


if __name__ == "__main__":
    sys.exit(main())
