"""Evaluate a run: FID, test reconstruction RMSE, OOD AUROC.

The same as `bidvl evaluate` (bidvl/cli/evaluate.py, where the options are documented), kept so that
`python launch/evaluate.py ...` and `accelerate launch launch/evaluate.py ...` work in a clone.
"""

import sys

from bidvl.cli import run_command


def main(argv=None) -> int:
    return run_command("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
