"""Converts a dataset into a bidvl shards folder (`<split>-000000.tar ...` + `meta.json`).

The same as `bidvl make-shards` (bidvl/cli/make_shards.py, where the options are documented), kept so that
`python launch/make_shards.py ...` and `accelerate launch launch/make_shards.py ...` work in a clone.
"""

import sys

from bidvl.cli import run_command


def main(argv=None) -> int:
    return run_command("make_shards", argv)


if __name__ == "__main__":
    sys.exit(main())
