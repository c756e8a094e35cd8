"""Run a study: training runs of one engine at an equal time budget, evaluated alike.

    python launch/study.py --config configs/studies/fashion_mnist.yaml
    python launch/study.py --config configs/studies/fashion_mnist.yaml --only vae,bidvl_offset
    python launch/study.py --config configs/studies/fashion_mnist.yaml --report-only

What it does and the study file's keys: bidvl/study/__init__.py.
"""

import argparse
import sys
from pathlib import Path

from bidvl.errors import BidvlError
from bidvl.study import load_study, run_study


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="study YAML file")
    p.add_argument("--only", default="", help="comma list of run names (default: all)")
    p.add_argument("--budget-minutes", type=float, default=None, help="override budget_minutes")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    args = p.parse_args(argv)
    try:
        study = load_study(Path(args.config), args.budget_minutes)
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        print(f"wrote {run_study(study, only, args.report_only)}")
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
