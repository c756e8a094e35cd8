"""Train BiDVL: `accelerate launch launch/train.py [--config configs/X.yaml] [key=value ...]`.

Without arguments it trains the embedded default, configs/digits.yaml (scikit-learn's digits,
shards built on first use). Overrides are dotted config keys, e.g. `train.max_steps=100`.
"""

import argparse
import sys
from pathlib import Path

from bidvl.config import ConfigError, load_config
from bidvl.data import ShardError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits.yaml"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 run.dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from bidvl.engine import train

        train(cfg)
    except (ConfigError, ShardError, FloatingPointError) as exc:
        # Bad input or a diverged run: one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
