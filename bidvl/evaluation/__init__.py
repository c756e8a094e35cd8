"""Evaluation: FID, test reconstruction RMSE, OOD AUROC, sampling (see launch/evaluate.py,
launch/sample.py).

    from bidvl.evaluation import load_run, evaluate_nets, EvalOptions, write_report
    run = load_run("runs/cifar10")                                  # export or latest checkpoint
    report = evaluate_nets(None, run.cfg, run.nets, EvalOptions(metrics=("rmse", "ood")))
    write_report("runs/cifar10", run.step, report)

Modules: loading (run folder -> nets), sampling (world-size-independent samples), metrics (RMSE,
AUROC), fid (Fréchet distance, feature extractors, reference statistics), evaluator (the suite and
its report files), periodic (`PeriodicEvaluation`, the engine's).
"""

from .evaluator import EvalOptions, evaluate_nets, evaluate_run, markdown, write_report
from .fid import feature_extractor, frechet_distance
from .loading import EvalError, LoadedRun, load_run, resolve_weights
from .periodic import PeriodicEvaluation
from .sampling import sample_images

__all__ = [
    "EvalOptions", "evaluate_nets", "evaluate_run", "markdown", "write_report", "feature_extractor",
    "frechet_distance", "EvalError", "LoadedRun", "load_run", "resolve_weights",
    "PeriodicEvaluation", "sample_images",
]
