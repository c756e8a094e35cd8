"""The stages of one run, each in the fresh process the runner starts for it (runner._run_stage):
`python -m bidvl.study train CONFIG [OVERRIDE...] | evaluate RUN_DIR OPTIONS_JSON | grids RUN_DIR`.
Why each stage has its own process: the package docstring (bidvl/study/__init__.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torchvision.utils import save_image

from bidvl.config import load_config
from bidvl.engine import train
from bidvl.errors import BidvlError
from bidvl.evaluation import EvalOptions, load_run
from bidvl.evaluation.evaluator import evaluate_run
from bidvl.evaluation.sampling import reconstruction_grid, sample_grid


def train_stage(config: str, overrides: list[str]) -> None:
    """Trains `config` with `overrides` to the end (max_steps, time budget or a signal), as
    launch/train.py does."""
    train(load_config(config, overrides))


def evaluate_stage(run_dir: str, options: dict) -> None:
    """launch/evaluate.py --run RUN_DIR with `options` (EvalOptions fields): the report files."""


    accelerator = Accelerator()
    run = load_run(run_dir, device=accelerator.device)
    opts = EvalOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    report, path = evaluate_run(accelerator, run_dir, run, opts)
    print(json.dumps(report["scalars"], indent=2))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    accelerator.end_training()


def grids_stage(run_dir: str) -> None:
    """RUN_DIR/samples.png (64 samples) and RUN_DIR/reconstructions.png (32 test images and their
    reconstructions), as launch/sample.py draws them."""


    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = load_run(run_dir, device=device)
    for kind, (images, grid) in (("samples", sample_grid(run, 64, device=device)),
                                 ("reconstructions", reconstruction_grid(run, 32, device=device))):
        save_image(grid, str(Path(run_dir) / f"{kind}.png"))
        print(f"wrote {len(images)} {kind} of step {run.step} ({run.kind}) to {Path(run_dir) / kind}.png")


def stage_main(argv: list[str]) -> int:
    """`python -m bidvl.study train CONFIG [OVERRIDE...] | evaluate RUN_DIR OPTIONS_JSON | grids
    RUN_DIR`: one stage of one run, in the fresh process `run_one` starts for it."""
    stages = {"train": lambda config, *overrides: train_stage(config, list(overrides)),
              "evaluate": lambda run_dir, options: evaluate_stage(run_dir, json.loads(options)),
              "grids": grids_stage}
    if not argv or argv[0] not in stages:
        print(f"usage: python -m bidvl.study {{{','.join(stages)}}} ARGS... (the stages of "
              "launch/study.py; see bidvl/study/__init__.py)", file=sys.stderr)
        return 2
    try:
        stages[argv[0]](*argv[1:])
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)  # bad input or a diverged run: one line
        return 2
    return 0
