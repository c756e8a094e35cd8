"""The `bidvl` command (installed with the package; also `python -m bidvl`, and so
`accelerate launch -m bidvl train ...`):

    bidvl train [--config NAME|PATH] [key=value ...]   train (default config: digits, shards built on first use)
    bidvl sample --run RUN --out grid.png               samples or reconstructions of a trained model
    bidvl evaluate --run RUN                            FID, reconstruction RMSE, OOD AUROC
    bidvl make-shards DATASET --out FOLDER              write WebDataset shards for a dataset
    bidvl study --config STUDY.yaml                     several runs at an equal budget, one report

Each subcommand is a module of this package with `main(argv) -> exit code`; launch/*.py in the
repository are thin wrappers around the same functions (`run_command`).

Ctrl-C while the command is still importing (torch takes seconds) ends it with `error:
interrupted` and exit 130, as after the imports, instead of a traceback.
"""

from __future__ import annotations

import importlib
import signal
import sys

COMMANDS = {  # subcommand -> (module, one line)
    "train": ("train", "train a model (accelerate launch -m bidvl train ... for several processes)"),
    "sample": ("sample", "write samples or reconstructions of a trained model"),
    "evaluate": ("evaluate", "FID, reconstruction RMSE and OOD AUROC of a trained model"),
    "make-shards": ("make_shards", "write WebDataset shards (+ meta.json) for a dataset"),
    "study": ("study", "run a study: several trainings at an equal budget, one report"),
}


def usage() -> str:
    from bidvl import __version__

    lines = [f"bidvl {__version__}: Bi-level Doubly Variational Learning of energy-based latent variable models",
             "", "usage: bidvl COMMAND [options]   (bidvl COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "  --version    print the version and exit"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from bidvl import __version__

        print(f"bidvl {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    sys.argv = [f"bidvl {args[0]}", *args[1:]]  # argparse's prog: "bidvl train"
    return run_command(COMMANDS[args[0]][0], args[1:])


def run_command(module: str, argv: list[str] | None = None) -> int:
    """bidvl.cli.MODULE's main(argv), imported here: a Ctrl-C before the command installs its own
    handler (the trainer's) is one line, 130. An import that a Ctrl-C cut in half can fail later
    with another error (numpy's lazy submodules recurse): after a Ctrl-C, that is an interrupt too."""
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return importlib.import_module(f"bidvl.cli.{module}").main(argv)
    except BaseException as exc:
        if not (interrupted or isinstance(exc, KeyboardInterrupt)) or isinstance(exc, SystemExit):
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)
