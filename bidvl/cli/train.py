"""Train BiDVL: `bidvl train [--config NAME|PATH] [key=value ...]`; on several processes
`accelerate launch -m bidvl train ...` (or, in the repository, `accelerate launch launch/train.py ...`).

Without arguments it trains the embedded default, the shipped config `digits` (scikit-learn's
digits, shards built on first use). --config takes a YAML file or the name of a shipped config
(cifar10, celeba64, ...: bidvl/configs). Overrides are dotted config keys, e.g. `train.max_steps=100`.

The run folder is checked and locked as soon as the config is read (RUN_DIR/.lock, bidvl.run_dir's
FolderLock, on the process that will be rank 0), before the trainer's imports (Accelerate,
DeepSpeed, the data stack), the processes' start and the nets: a second trainer on a folder in use
is refused naming the holder within the seconds that reading the config takes (it imports torch for
the nets' and objectives' tables), not after the trainer is built.
"""

import argparse
import os
import signal
import sys

from bidvl.config import SECTIONS, SHIPPED_CONFIGS, load_config, shipped_configs, to_yaml
from bidvl.errors import BidvlError
from bidvl.run_dir import FolderLock, RunDir

DEFAULT_CONFIG = SHIPPED_CONFIGS / "digits.yaml"
# Where the launchers Accelerate reads (torchrun, DeepSpeed, MPI) put the process's global rank:
# accelerate.utils.environment.get_cpu_distributed_information reads the same names.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def main(argv=None):
    sections = "\n".join(f"  {name:<11} {text}" for name, text in SECTIONS.items())
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config sections (every key with its default, range and meaning: --help-config, docs/config.md):\n{sections}")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help=f"YAML config file, or a shipped config's name ({', '.join(shipped_configs())}); "
                             "default: digits")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the file with the overrides) as YAML and exit")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config key with its default, what it accepts and what it means, and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 run.dir=runs/x")
    args = parser.parse_args(argv)
    if args.help_config:
        from bidvl.config_reference import text

        print(text())
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        lock = lock_before_the_imports(cfg.run.dir)
        try:
            from bidvl.engine import train

            stop_signal = train(cfg, lock)
        finally:
            if lock is not None:  # (a trainer that ended released it already)
                lock.release()
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # the last moments: exit as planned
            signal.signal(sig, _after_the_run)
    except KeyboardInterrupt:  # Ctrl-C before training started
        print("error: interrupted", file=sys.stderr)
        return 130
    except BidvlError as exc:  # bad input or a run stopped by its own rules: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Ctrl-C: checkpointed, then 130 as for any interrupted command; SIGTERM/SIGUSR1 (SLURM's
    # time limit, requeue): checkpointed, 0.
    return 130 if stop_signal == signal.SIGINT else 0


def lock_before_the_imports(run_dir) -> FolderLock | None:
    """The run folder's lock, taken by the process the environment names rank 0 (or a single
    process) before the trainer is imported and built; None on the other ranks, which follow the
    main process's answer once the processes are up (bidvl.checkpoint.RunLock). A folder that
    cannot hold a run, or is in use, is a BidvlError naming it."""
    if any(os.environ.get(name, "0") not in ("", "0") for name in RANK_VARIABLES):
        return None
    run = RunDir(run_dir)
    lock = FolderLock(run.path)
    refusal = run.layout_problem() or lock.take()
    if refusal:
        raise BidvlError(refusal)
    return lock


def _after_the_run(signum, frame):
    print(f"signal {signum} after the training had ended: exiting as planned", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
