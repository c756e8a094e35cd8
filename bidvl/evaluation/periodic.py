"""Evaluation inside training, every `eval.every` steps (called by the engine on every rank).

    if cfg.eval.every and step % cfg.eval.every == 0:
        figures = evaluate_during_training(accelerator, cfg, energy_net, encoder, generator, step)
        accelerator.log(figures, step=step)      # {"eval/rmse": ..., "eval/auroc_uniform": ...}

It uses `cfg.eval` (metrics, num_samples, max_test, batch_size, features, inception_weights), runs
collectives (every rank must call it), returns the same flat dict on every rank and logs nothing
itself. Nets may be DDP-wrapped; they are evaluated through their unwrapped modules and handed back
in the mode they came in (train, inside the training loop; an EMA copy stays in eval), with weights
and buffers unchanged (train-mode sampling restores buffers).
No global RNG is used (latents and noise come from their own seeded generators), so a run with
periodic evaluation trains exactly as one without. FID runs only when `eval.features` or Inception
weights (`eval.inception_weights`, BIDVL_INCEPTION_WEIGHTS or torch's hub cache:
fid.inception_weights_file) give an extractor; otherwise it is skipped with one warning. The feature extractor is built once and kept for later calls.
"""

from __future__ import annotations

import warnings

from bidvl.config import Config
from bidvl.models.registry import Nets
from bidvl.run_dir import RunDir

from . import fid as fid_lib
from .evaluator import EvalOptions, evaluate_nets, parse_metrics
from .gather import process_layout

_extractors: dict = {}
_warned: set = set()


def _extractor(cfg: Config, device):
    """eval.features, or Inception with the weights fid.inception_weights_file finds; None: none."""
    key = (cfg.eval.features, fid_lib.inception_weights_file(cfg.eval.inception_weights), str(device))
    if key not in _extractors:
        _extractors[key] = fid_lib.feature_extractor(cfg.eval.features, key[1], device, required=False)
    return _extractors[key]


def evaluate_during_training(accelerator, cfg: Config, energy_net, encoder, generator, step: int) -> dict:
    unwrap = accelerator.unwrap_model if accelerator is not None else (lambda m: m)
    nets = Nets(unwrap(energy_net), unwrap(encoder), unwrap(generator))
    metrics = parse_metrics(cfg.eval.metrics) if cfg.eval.metrics.strip() else ()
    extractor = None
    if "fid" in metrics:
        extractor = _extractor(cfg, process_layout(accelerator).device)
        if extractor is None:
            metrics = tuple(m for m in metrics if m != "fid")
            if "fid" not in _warned:
                _warned.add("fid")
                warnings.warn("eval.metrics includes fid but no Inception weights were found and "
                              "eval.features is not set: FID is skipped during training. "
                              + fid_lib.weights_help(), stacklevel=2)
    if not metrics:
        return {}
    opts = EvalOptions(
        metrics=metrics, num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
        max_test=cfg.eval.max_test, extractor=extractor,
        cache_dir=str(RunDir(cfg.run.dir).eval_cache),
    )
    modes = [net.training for net in nets]
    try:
        report = evaluate_nets(accelerator, cfg, nets, opts)
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)
    return dict(report["scalars"])

