"""Train BiDVL (the default: the shipped `digits` config, shards built on first use).

The same as `bidvl train` (bidvl/cli/train.py, where the options are documented), kept so that
`python launch/train.py ...` and `accelerate launch launch/train.py ...` work in a clone.
"""

import sys

from bidvl.cli import run_command


def main(argv=None) -> int:
    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
