"""Run a study: training runs of one engine at an equal time budget, evaluated alike.

The same as `bidvl study` (bidvl/cli/study.py, where the options are documented), kept so that
`python launch/study.py ...` and `accelerate launch launch/study.py ...` work in a clone.
"""

import sys

from bidvl.cli import run_command


def main(argv=None) -> int:
    return run_command("study", argv)


if __name__ == "__main__":
    sys.exit(main())
