"""One process of the device-read count in tests/test_device_reads.py: trains the digits config
with the given overrides through `Trainer.fit`, counting the Tensor reads
(bidvl.benchmarking.DeviceReads) of each iteration, and writes OUT/reads_rank{R}.json:

    {"per_iteration": [reads of iteration 1, 2, ...], "sites": {"file:line": count, ...}}

Iteration i's reads run from the start of its train_step to the start of the next one (its step,
the flags, the sync-step work after it); the last iteration's include the export and the closing
summary, so it is left out. Started as users start training: `accelerate launch` (DDP over gloo
on CPU ranks), or plainly as one process.
"""

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def count_reads(trainer) -> tuple[list[int], dict]:
    """Runs trainer.fit() counting reads; (reads per iteration but the last, {site: count})."""
    from bidvl.benchmarking import DeviceReads

    marks = []
    step = trainer.train_step

    def marked(*args, **kwargs):
        marks.append(reads.count)
        return step(*args, **kwargs)

    trainer.train_step = marked
    with DeviceReads() as reads:
        trainer.fit()
    return [b - a for a, b in zip(marks, marks[1:])], reads.sites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    from bidvl.config import load_config
    from bidvl.engine import Trainer

    trainer = Trainer(load_config(REPO / "configs/digits.yaml", a.overrides))
    try:
        per_iteration, sites = count_reads(trainer)
    finally:
        trainer.close()
    rank = int(os.environ.get("RANK", 0))
    Path(a.out, f"reads_rank{rank}.json").write_text(json.dumps({"per_iteration": per_iteration, "sites": sites}))


if __name__ == "__main__":
    main()
