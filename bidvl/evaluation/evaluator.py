"""The evaluation suite: FID, test reconstruction RMSE and OOD AUROC of one set of nets.

    report = evaluate_nets(accelerator, cfg, nets, EvalOptions(metrics=("rmse", "ood")))
    report["scalars"]   # {"eval/rmse": ..., "eval/auroc_uniform": ...}
    write_report(run_dir, step, report)   # main process: eval/step_XXXXXXXX.{json,md} + TensorBoard
    report, path = evaluate_run(accelerator, run_dir, load_run(run_dir), opts)  # + options, weights
    report["generator"]  # "ema" | "trained": the generator evaluate_run's weights used (also in
                         # report["fid"] and report["rmse"], which a later evaluation may not redo)

Every rank calls `evaluate_nets` (the passes gather across ranks); the figures are computed on the
main process and broadcast, so every rank returns the same report. Bad inputs (OOD folders of
another size, missing weights) are checked on every rank before any pass, so all ranks fail
together instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from bidvl import objectives
from bidvl.ceilings import loader_workers_problem
from bidvl.config import COUNT_OR_ZERO, EVAL_METRICS, RANGES, SEED, Config
from bidvl.data import split_info
from bidvl.io import write_text
from bidvl.run_dir import RunDir

from . import fid as fid_lib
from .fid import frechet_distance, reference_statistics, sample_features, statistics
from .gather import broadcast_from_main, process_layout
from .loading import EvalError, heldout_data, train_data
from .metrics import auroc, batch_statistics_pass, heldout_pass, ood_split, rmse_figures, uniform_pass
from .sampling import BN_MODES

METRICS = EVAL_METRICS
# (EvalOptions field, the command line's option, its range: bidvl.config's, as for the eval.* keys)
OPTION_RANGES = (("num_samples", "--num-samples", RANGES["eval.num_samples"]),
                 ("max_test", "--max-test", RANGES["eval.max_test"]),
                 ("batch_size", "--batch-size", RANGES["eval.batch_size"]),
                 ("seed", "--seed", SEED), ("num_workers", "--num-workers", COUNT_OR_ZERO))


@dataclass
class EvalOptions:
    metrics: tuple[str, ...] = METRICS
    num_samples: int = 50_000  # generated samples for FID
    batch_size: int = 100
    split: str = ""  # in-distribution test split; "" = cfg.data.test_split
    max_test: int = 0  # use only the first max_test test images for rmse/ood (0: all)
    ood: tuple[str, ...] = ()  # OOD shards folders (uniform noise is always added)
    fid_ref: str = "train"  # train | test: the split whose statistics FID compares against
    features: str = ""  # "" = Inception; else a TorchScript / timm-spec file (FID-style)
    inception_weights: str = ""  # "" = env BIDVL_INCEPTION_WEIGHTS
    seed: int = 0  # latents of the generated samples and the uniform noise
    bn_mode: str = "train"  # generator mode while sampling for FID (the authors: train)
    cache_dir: str = ""  # where reference statistics go when the shards folder is read-only
    num_workers: int = 0  # data loader workers per process
    extractor: Optional[object] = field(default=None, repr=False)  # a ready fid.Features

    def __post_init__(self):
        """Every option checked once, here, against the ranges bidvl.config owns (the same as the
        eval.* keys); the errors name the command line's option. What depends on the data (the FID
        reference's size, the OOD folders) is checked by `check_options`."""
        for m in self.metrics:
            if m not in METRICS:
                raise EvalError(f"metric {m!r}: expected one of {', '.join(METRICS)}")
        if self.bn_mode not in BN_MODES:
            raise EvalError(f"--bn-mode {self.bn_mode!r}: expected one of {', '.join(BN_MODES)}")
        if self.fid_ref not in ("train", "test"):
            raise EvalError(f"--fid-ref {self.fid_ref!r}: expected train or test")
        for name, option, accepted in OPTION_RANGES:
            accepted.check(option, getattr(self, name), joiner=" ")
        too_many = loader_workers_problem(self.num_workers, "--num-workers", joiner=" ")
        if too_many:
            raise EvalError(too_many)


def parse_metrics(text: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise EvalError(f"--metrics {text!r}: expected a comma list of {', '.join(METRICS)}")
    return names


def ood_name(folder: str, taken: set) -> str:
    """Column / tag name of an OOD folder: its base name, made unique."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(folder).resolve().name) or "ood"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def check_options(cfg: Config, opts: EvalOptions) -> list[tuple[str, str, str]]:
    """Fails early on what the options ask of the data (EvalOptions checked the options
    themselves); returns the OOD sets as (name, folder, split)."""
    if "fid" in opts.metrics:
        ref_folder, ref_split = train_data(cfg) if opts.fid_ref == "train" else heldout_data(cfg, opts.split)
        _, _, counts = split_info(ref_folder, ref_split, None, 0, cfg.data.resolution, cfg.data.channels)
        if sum(counts) < 2:
            raise EvalError(f"--fid-ref {opts.fid_ref}: split {ref_split!r} of {ref_folder} has "
                            f"{sum(counts)} image(s); FID needs at least 2")
    sets, taken = [], {"uniform"}
    if "ood" in opts.metrics:
        for folder in opts.ood:
            split = ood_split(folder, cfg.data.resolution, cfg.data.channels)
            sets.append((ood_name(folder, taken), str(folder), split))
    return sets


def evaluate_nets(accelerator, cfg: Config, nets, opts: EvalOptions) -> dict:
    """Runs the requested metrics on all ranks; returns the same report on every rank."""
    ood_sets = check_options(cfg, opts)
    device, _, world, is_main = process_layout(accelerator)
    extractor = None
    if "fid" in opts.metrics:
        extractor = opts.extractor or fid_lib.feature_extractor(opts.features, opts.inception_weights, device)
    shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    fit = (cfg.data.resolution, cfg.data.channels)  # what shards without meta.json are fitted to
    report: dict = {"world_size": world}
    scalars: dict = {}

    folder, split = heldout_data(cfg, opts.split)
    objective = objectives.build(cfg)
    score = objective.ood_score
    nets = nets._replace(energy_net=objective.ood_scorer(*nets))  # (the VAE: its ELBO)
    if "rmse" in opts.metrics or "ood" in opts.metrics:
        held = heldout_pass(accelerator, nets, folder, split, opts.batch_size,
                            max_count=opts.max_test, reconstruct="rmse" in opts.metrics,
                            energy="ood" in opts.metrics, num_workers=opts.num_workers, fit=fit)
        data = {"folder": str(folder), "split": split, "count": int(len(held["index"]))}
    if "rmse" in opts.metrics:  # the authors' BatchNorm mode first (see metrics.py)
        sse = batch_statistics_pass(accelerator, nets, folder, split, opts.batch_size,
                                    max_count=opts.max_test, num_workers=opts.num_workers, fit=fit)
        figures = rmse_figures(sse, math.prod(shape))
        running = rmse_figures(held["sse"], math.prod(shape))
        report["rmse"] = {**figures, "data": data, "batch_size": opts.batch_size,
                          "reconstruction": "G(mu(v)), encoder and generator in train mode (BatchNorm "
                                            "statistics of each test batch, the authors' metric)",
                          "running_stats": {**running, "reconstruction": "G(mu(v)), nets in eval mode "
                                            "(BatchNorm running statistics)"}}
        scalars.update({"eval/rmse": figures["rmse"], "eval/rmse_01": figures["rmse_01"],
                        "eval/sse_per_image": figures["sse_per_image"],
                        "eval/rmse_running_stats": running["rmse"]})
    if "ood" in opts.metrics:
        in_scores = -held["energy"]
        results, counts = {}, {}
        noise = uniform_pass(accelerator, nets.energy_net, len(in_scores), shape, opts.batch_size, opts.seed)
        results["uniform"], counts["uniform"] = auroc(in_scores, -noise), len(noise)
        for name, ood_folder, ood_split_name in ood_sets:
            rows = heldout_pass(accelerator, nets, ood_folder, ood_split_name, opts.batch_size,
                                reconstruct=False, energy=True, num_workers=opts.num_workers, fit=fit)
            results[name], counts[name] = auroc(in_scores, -rows["energy"]), len(rows["energy"])
        report["ood"] = {
            "score": score, "model": cfg.objective.name, "in_distribution": data, "auroc": results,
            "sets": {"uniform": {"kind": "U[-1,1] noise", "count": counts["uniform"], "seed": opts.seed},
                     **{n: {"folder": f, "split": s, "count": counts[n]} for n, f, s in ood_sets}},
        }
        scalars.update({f"eval/auroc_{n}": v for n, v in results.items()})
    if "fid" in opts.metrics:
        ref_folder, ref_split = train_data(cfg) if opts.fid_ref == "train" else (folder, split)
        reference = reference_statistics(accelerator, extractor, ref_folder, ref_split,
                                         opts.batch_size, opts.cache_dir, opts.num_workers, fit)
        generated = sample_features(accelerator, extractor, nets.generator, opts.num_samples,
                                    cfg.model.latent_dim, shape, opts.seed, opts.batch_size, opts.bn_mode)
        if is_main:
            value = frechet_distance(*statistics(generated), reference["mu"], reference["sigma"])
            report["fid"] = {
                "value": value, "label": extractor.label, "features": extractor.name,
                "comparable_to_published": extractor.comparable, "extractor": extractor.identity,
                "num_samples": opts.num_samples, "seed": opts.seed, "bn_mode": opts.bn_mode,
                "batch_size": opts.batch_size,
                "reference": {"folder": str(ref_folder), "split": ref_split,
                              "count": reference["count"], "cache": reference["cache"]},
            }
            scalars["eval/fid"] = value
    report["scalars"] = scalars
    return broadcast_from_main(accelerator, report)


# ---------------------------------------------------------------- report files


def _fmt(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def markdown(report: dict) -> str:
    lines = [f"# Evaluation of {report.get('run', '?')} at step {report.get('step', '?')}", ""]
    w = report.get("weights")
    if w:
        gen = {"ema": "its EMA (generator_ema.safetensors)", "trained": "the trained one"}.get(
            w.get("generator", ""), "")
        lines += [f"Weights: {w['kind']} `{w['path']}`" + (f"; generator: {gen}" if gen else "") + ".", ""]
    rows = []
    if "fid" in report:
        f = report["fid"]
        rows.append((f"{f['label']}: {f['num_samples']} samples (bn_mode {f['bn_mode']}"
                     + (f", {f['generator']} generator" if "generator" in f else "") + ") vs "
                     f"{f['reference']['split']} split of `{f['reference']['folder']}` "
                     f"({f['reference']['count']} images)", _fmt(f["value"])))
    if "rmse" in report:
        r = report["rmse"]
        where = f"{r['data']['split']} split of `{r['data']['folder']}`, {r['num_images']} images"
        batches = f"batch statistics of test batches of {r['batch_size']}" if "batch_size" in r else "batch statistics"
        rows += [(f"RMSE per pixel value, [-1, 1] scale ({where}; {batches}, the authors' metric)",
                  _fmt(r["rmse"])),
                 ("RMSE per pixel value, [0, 1] scale", _fmt(r["rmse_01"])),
                 ("Summed squared error per image, [-1, 1] scale (the authors' loss)", _fmt(r["sse_per_image"]))]
        if "running_stats" in r:
            rows.append(("RMSE per pixel value, [-1, 1] scale, BatchNorm running statistics (nets in eval mode)",
                         _fmt(r["running_stats"]["rmse"])))
    if rows:
        lines += ["| Metric | Value |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows], ""]
    if "ood" in report:
        o = report["ood"]
        names = list(o["auroc"])
        lines += [f"OOD detection, AUROC of {o['score']}; in-distribution: {o['in_distribution']['split']} "
                  f"split of `{o['in_distribution']['folder']}` ({o['in_distribution']['count']} images).", "",
                  "| Model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  f"| {o.get('model', 'bidvl')} (step {report.get('step', '?')}) | "
                  + " | ".join(f"{o['auroc'][n]:.4f}" for n in names) + " |", "",
                  "OOD sets: " + "; ".join(
                      f"{n}: " + (f"`{s['folder']}` split {s['split']}" if "folder" in s else s["kind"])
                      + f", {s['count']} images" for n, s in o["sets"].items()) + ".", ""]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, step: int, report: dict, weights: Optional[dict] = None,
                 tensorboard: bool = True) -> Path:
    """Main process only. Merges into RUN_DIR/eval/step_XXXXXXXX.json (a later `--metrics fid`
    adds to an earlier `rmse,ood`), writes the .md beside it and the scalars to TensorBoard."""
    run = RunDir(run_dir)
    run_dir = run.path
    path = run.eval_report(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update({k: v for k, v in report.items() if k != "scalars"})
    merged["scalars"] = {**merged.get("scalars", {}), **report.get("scalars", {})}
    merged.update({"run": str(run_dir), "step": step})
    if weights:
        merged["weights"] = weights
    write_text(path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
    write_text(path.with_suffix(".md"), markdown(merged))
    if tensorboard and report.get("scalars"):
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(run.tensorboard_events)) as writer:  # eval points join the training curves
            for tag, value in report["scalars"].items():
                writer.add_scalar(tag, value, step)
    return path


def options_dict(opts: EvalOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in fields(opts) if f.name != "extractor"}


def evaluate_run(accelerator, run_dir: str | os.PathLike, run, opts: EvalOptions
                 ) -> tuple[dict, Optional[Path]]:
    """Evaluates `run` (`load_run(run_dir, ...)`) on every rank; the main process writes the report
    into `run_dir` with the options and the weights used. Returns (report, the report file on the
    main process, else None)."""
    report = evaluate_nets(accelerator, run.cfg, run.nets, opts)
    if not process_layout(accelerator).is_main:
        return report, None
    report["options"] = options_dict(opts)
    generator = getattr(run, "generator", "trained")
    report["generator"] = generator
    for section in ("fid", "rmse"):  # the figures the generator enters (merged reports keep theirs)
        if section in report:
            report[section]["generator"] = generator
    if "ood" in report and objectives.build(run.cfg).ood_score_uses_generator:  # (the VAE's ELBO)
        report["ood"]["generator"] = generator
    path = write_report(run_dir, run.step, report,
                        weights={"kind": run.kind, "path": str(run.source), "step": run.step,
                                 "generator": generator})
    return report, path
