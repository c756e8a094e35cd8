"""Evaluation inside training, every `eval.every` steps (called by the engine on every rank).

    periodic = PeriodicEvaluation(accelerator, cfg)         # one per run (the Trainer's)
    figures = periodic(energy_net, encoder, generator, step)  # {"eval/rmse": ..., "eval/auroc_uniform": ...}
    log_metrics(accelerator, figures, step)              # (bidvl.tracking)

It uses `cfg.eval` (metrics, num_samples, max_test, batch_size, features, inception_weights), runs
collectives (every rank must call it), returns the same flat dict on every rank and logs nothing
itself. Nets may be DDP-wrapped; they are evaluated through their unwrapped modules and handed back
in the mode they came in (train, inside the training loop; an EMA copy stays in eval), with weights
and buffers unchanged (train-mode sampling restores buffers).
No global RNG is used (latents and noise come from their own seeded generators), so a run with
periodic evaluation trains exactly as one without. FID runs only when `eval.features` or Inception
weights (`eval.inception_weights`, BIDVL_INCEPTION_WEIGHTS or torch's hub cache:
fid.inception_weights_file) give an extractor; otherwise it is skipped with one warning per run.
The feature extractor is built on the first call and kept by the object (no module-level state:
two runs in one process each build and warn for themselves).
"""

from __future__ import annotations

import warnings

from bidvl.config import Config
from bidvl.models.registry import Nets
from bidvl.run_dir import RunDir

from . import fid as fid_lib
from .evaluator import EvalOptions, evaluate_nets, parse_metrics
from .gather import process_layout

_UNSET = object()


class PeriodicEvaluation:
    def __init__(self, accelerator, cfg: Config):
        self.accelerator, self.cfg = accelerator, cfg
        self.metrics = parse_metrics(cfg.eval.metrics) if cfg.eval.metrics.strip() else ()
        self._extractor = _UNSET  # built on the first call that needs it (None: no FID features)

    def extractor(self):
        """eval.features, or Inception with the weights fid.inception_weights_file finds; None: none
        (FID is then skipped, with one warning)."""
        if self._extractor is _UNSET:
            cfg = self.cfg.eval
            device = process_layout(self.accelerator).device
            self._extractor = fid_lib.feature_extractor(cfg.features, fid_lib.inception_weights_file(
                cfg.inception_weights), device, required=False)
            if self._extractor is None:
                warnings.warn("eval.metrics includes fid but no Inception weights were found and "
                              "eval.features is not set: FID is skipped during training. "
                              + fid_lib.weights_help(), stacklevel=3)
        return self._extractor

    def __call__(self, energy_net, encoder, generator, step: int) -> dict:
        unwrap = self.accelerator.unwrap_model if self.accelerator is not None else (lambda m: m)
        nets = Nets(unwrap(energy_net), unwrap(encoder), unwrap(generator))
        metrics, extractor = self.metrics, None
        if "fid" in metrics:
            extractor = self.extractor()
            if extractor is None:
                metrics = tuple(m for m in metrics if m != "fid")
        if not metrics:
            return {}
        cfg = self.cfg
        opts = EvalOptions(metrics=metrics, num_samples=cfg.eval.num_samples, batch_size=cfg.eval.batch_size,
                           max_test=cfg.eval.max_test, extractor=extractor,
                           cache_dir=str(RunDir(cfg.run.dir).eval_cache))
        modes = [net.training for net in nets]
        try:
            report = evaluate_nets(self.accelerator, cfg, nets, opts)
        finally:
            for net, mode in zip(nets, modes):
                net.train(mode)
        return dict(report["scalars"])
