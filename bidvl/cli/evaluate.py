"""Evaluate a run: FID, test reconstruction RMSE, OOD AUROC.

    python launch/evaluate.py --run runs/cifar10 --inception-weights weights-inception-2015-12-05-6726825d.pth
    accelerate launch launch/evaluate.py --run runs/cifar10 --metrics rmse,ood --ood shards/svhn shards/celeba32

Weights: the export RUN_DIR/model if present, else the latest complete checkpoint (--checkpoint
latest|final|STEP|PATH picks one). The generator (FID samples, reconstructions) is its EMA
(generator_ema.safetensors, written with train.ema > 0) when the weights folder has one; --no-ema
uses the trained generator; the report's "generator" says which ("ema" | "trained"). Writes
RUN_DIR/eval/step_XXXXXXXX.json and .md (merged with an earlier evaluation of the same step) and logs eval/fid, eval/rmse, eval/auroc_<name> to
RUN_DIR/tensorboard at that step; evaluating the export also refreshes the Evaluation section of
its model card (RUN_DIR/model/README.md). Under `accelerate launch` every process evaluates its share; the
figures do not depend on the number of processes. FID's Inception weights (torch-fidelity's
weights-inception-2015-12-05-6726825d.pth) come from --inception-weights, BIDVL_INCEPTION_WEIGHTS
or torch's hub cache (TORCH_HOME/hub/checkpoints, where torch-fidelity keeps them); they are
downloaded there only with --download-weights. --features gives an FID-style figure instead.
"""

import argparse
import json
import sys
from pathlib import Path

from bidvl.config import ConfigError, path_problem
from bidvl.errors import BidvlError
from bidvl.run_dir import RunDir


def check_args(args) -> None:
    """The report folder writable, before anything is loaded or written (an unwritable
    RUN_DIR/eval would otherwise fail only after the whole evaluation). The options themselves are
    checked once, by EvalOptions."""
    problem = Path(args.run).is_dir() and path_problem(RunDir(args.run).eval, "folder", writable=True)
    if problem:  # (a missing run folder is load_run's error)
        raise ConfigError(f"--run {args.run}: cannot write the report: {problem}")


def download_weights(accelerator, given: str) -> None:
    """--download-weights: the main process fetches the weights into torch's hub cache unless a
    file is found already; the other processes wait for it."""
    from bidvl.evaluation import fid

    if accelerator.is_main_process and not fid.inception_weights_file(given):
        print(f"downloading the Inception weights to {fid.hub_cache_weights()}", file=sys.stderr, flush=True)
        fid.download_inception_weights()
    accelerator.wait_for_everyone()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds config.yaml)")
    p.add_argument("--checkpoint", default=None,
                   help="latest | final (the export) | STEP | checkpoint folder (default: export, else latest)")
    p.add_argument("--metrics", default="fid,rmse,ood", help="comma list of fid, rmse, ood (default: %(default)s)")
    p.add_argument("--ood", nargs="*", default=[], metavar="DIR",
                   help="OOD shards folders (their test split, or their only split); uniform noise is always added")
    p.add_argument("--num-samples", type=int, default=50_000, help="generated samples for FID (default: %(default)s)")
    p.add_argument("--split", default="", help="in-distribution test split (default: the config's data.test_split)")
    p.add_argument("--max-test", type=int, default=0, help="use only the first N test images for rmse/ood (0: all)")
    p.add_argument("--fid-ref", choices=("train", "test"), default="train",
                   help="reference statistics from the train split (the authors) or the test split")
    p.add_argument("--inception-weights", default="",
                   help="local Inception weights file (default: env BIDVL_INCEPTION_WEIGHTS, else torch's hub cache)")
    p.add_argument("--download-weights", action="store_true",
                   help="for FID, fetch the Inception weights into torch's hub cache if no file is found (needs a network)")
    p.add_argument("--features", default="",
                   help="another feature extractor: TorchScript file, or timm-spec .safetensors (FID-style figure)")
    p.add_argument("--batch-size", type=int, default=100, help="per process (default: %(default)s)")
    p.add_argument("--bn-mode", choices=("train", "eval"), default="train",
                   help="generator mode while sampling for FID (default: train, as the authors)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample latents and the noise images")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per process")
    p.add_argument("--no-ema", action="store_true",
                   help="use the trained generator even when the run has an EMA of it (generator_ema.safetensors)")
    args = p.parse_args(argv)

    from accelerate import Accelerator

    from bidvl.evaluation import EvalOptions, load_run
    from bidvl.evaluation.evaluator import evaluate_run, parse_metrics
    from bidvl.model_card import refresh_evaluation

    try:
        opts = EvalOptions(
            metrics=parse_metrics(args.metrics), num_samples=args.num_samples, batch_size=args.batch_size,
            split=args.split, max_test=args.max_test, ood=tuple(args.ood), fid_ref=args.fid_ref,
            features=args.features, inception_weights=args.inception_weights, seed=args.seed,
            bn_mode=args.bn_mode, cache_dir=str(RunDir(args.run).eval_cache), num_workers=args.num_workers,
        )
        check_args(args)
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    accelerator = Accelerator()
    try:
        if args.download_weights and "fid" in opts.metrics and not args.features:
            download_weights(accelerator, args.inception_weights)
        run = load_run(args.run, args.checkpoint, device=accelerator.device, ema=False if args.no_ema else None)
        report, path = evaluate_run(accelerator, args.run, run, opts)
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is not None:
        print(json.dumps(report["scalars"], indent=2))
        print(f"wrote {path} and {path.with_suffix('.md')}")
        if run.kind == "export":  # the card beside the exported weights shows this evaluation
            card = refresh_evaluation(Path(args.run), run.step)
            if card is not None:
                print(f"refreshed the evaluation in {card}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
