"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

A config file only holds values; every key it may hold is declared here with its type and default.
`load_config(path, overrides)` merges defaults <- YAML <- `key=value` overrides through OmegaConf's
structured configs, so an unknown key or a value of the wrong type fails before anything is built,
with the dotted key in the message. `validate` then checks values that types cannot express:
CHOICES (named values), RANGES (numbers, sizes, seeds, paths; NaN and inf included) and the few
checks that involve two keys, each error naming the key, the value and what was expected
(`train.energy_optim.lr=-0.1: expected a finite number > 0`). The launch scripts check their own
options with the same `Range`s, so nothing out of range reaches torch or numpy as a traceback.

Defaults are the authors' DCGAN settings at 32 px (their public code; the README's table of configs
names the settings each file follows): a config file only states what differs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bidvl.errors import BidvlError
from bidvl.models.registry import BUILDERS, ENERGY_OUTPUTS, RESOLUTIONS, encoder_head_bias, resolved_init
from bidvl.objectives import OBJECTIVES, auto_settings


class ConfigError(BidvlError, ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


@dataclass
class RunConfig:
    dir: str = "runs/digits"  # the run folder: config.yaml, checkpoints/, model/ (the export), logs
    seed: int = 0  # seeds the nets' initial weights, the data order and the noise


@dataclass
class DataConfig:
    # Shard folders (each with meta.json). `auto_build` lets the default config build its own
    # shards on first use (only for sources that ship with a package: digits, fashion-mnist).
    # `train`/`test` may also be a URL (http(s)://, s3://, gs://, az://, hf://), a `pipe:` command
    # template or a brace-expanded shard list (docs/data.md).
    train: str = "shards/digits"
    test: str = ""  # empty: same folder as `train`, split `test_split`
    train_split: str = "train"  # the split of meta.json the run trains on
    test_split: str = "test"  # the split held out (evaluation, health checks)
    auto_build: str = ""  # dataset name to build into `train` when it has no meta.json yet
    # Shards with a meta.json (bidvl make-shards) must match these; shards written by other tools
    # (no meta.json: img2dataset, webdataset's ShardWriter, ...) are fitted to them as they are read.
    resolution: int = 32  # image side in pixels
    channels: int = 1  # 1 (grey) or 3 (RGB)
    crop: str = "center"  # training images larger than data.resolution (other tools' shards): center or random crop after resizing the shorter side
    flip: bool = False  # mirror half the training images left to right (random per image, exact on resume)
    num_workers: int = 1  # DataLoader workers per process
    shuffle_buffer: int = 2000  # samples shuffled together in the stream (at most 1/4 of a rank's batches' samples)
    on_error: str = "raise"  # raise | skip: bad samples/shards stop the run, or are skipped and counted
    verify_shards: bool = True  # check each shard against the sha256 in meta.json as it is read (a bad one is bad data)
    max_skipped: int = 100  # with on_error=skip: stop once more than this many were skipped
    train_count: int = 0  # for a shard list without meta.json beside it: its samples (0: counted from the shards)
    net_retries: int = 5  # remote reads: tries after the first (dropped connection, timeout, 5xx)
    net_backoff: float = 1.0  # seconds before the first retry, doubled for each next one
    net_timeout: float = 60.0  # seconds an http(s) connect or read may stall
    net_shard_timeout: float = 600.0  # seconds one remote file (http(s), pipe:, object stores) may take in all, then a retry


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # a key of bidvl.models.registry.BUILDERS
    latent_dim: int = 100  # size of h, the generator's input and the encoder's output
    energy_width: int = 64  # the energy net's base width (stages widen from it; the authors' Ebasec)
    encoder_width: int = 48  # the encoder's base width (the authors' Qbasec)
    generator_width: int = 48  # the generator's base width (the authors' Pbasec)
    energy_output: str = "softplus"  # softplus | identity
    spectral_norm: bool = True  # on the energy net (and the timm backbone when arch=timm)
    timm_name: str = ""  # arch=timm: timm backbone for energy net and encoder; generator is dcgan
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP
    # How weights start (docs/fidelity.md): `normal` N(0, 0.02) conv/linear weights, zero biases,
    # BatchNorm 1/0 (the DCGAN scripts); `xavier` the authors' ResNet (Mimicry) init: Xavier-
    # uniform, gain sqrt(2) on the blocks' 3x3 convs, 1 on shortcuts, linear layers and the
    # generator's last conv, PyTorch's default biases; `triangle` Han et al.'s: N(0, 0.02) conv
    # weights, default biases, BatchNorm weight N(1, 0.02). auto: xavier for resnet, triangle for
    # triangle, normal otherwise.
    init: str = "auto"
    # The encoder's mu/logvar layers: `bias` or `no_bias`; auto: as the authors (no bias on the
    # ResNet encoder from 64 px up: their ResEncoder128 has bias=False; a bias everywhere else).
    encoder_heads: str = "auto"


@dataclass
class ObjectiveConfig:
    # bidvl | vae | divergence_triangle. The baselines run in the same engine: `vae` trains encoder
    # + generator on the negative ELBO only (energy net untouched); `divergence_triangle` (Han et
    # al. 2019) trains the energy net with the `difference` upper loss and encoder + generator on
    # recon + KL + E(G(h)) + w_latent x latent NLL (Han et al.: w_latent=0.1, see objectives.py).
    name: str = "bidvl"
    latent_term: str = "offset"  # offset | not_offset | none (bidvl only)
    w_latent: float = 1.0  # weight of the latent term in the lower level
    r_basic: float = 0.05  # r' in the paper
    ratio_bias: str = "none"  # none | sigmoid
    upper_loss: str = "difference"  # difference | hinge
    lower_steps: int = 1  # N
    order: str = "upper_first"  # upper_first (authors' code) | lower_first (Algorithm 1)
    # The latent term's normalisation: `mean` sum (mu(v_hat) - h_p)^2 / bs / h_dim (the DCGAN
    # scripts, w_latent 1), `sum_over_dims` sum / bs (the ResNet scripts, w_latent 1e-4);
    # auto: sum_over_dims for model.arch=resnet, mean otherwise.
    latent_reduction: str = "auto"
    # The lower level's h_p: `reuse` the upper level's draw (DCGAN scripts) or a `fresh` draw
    # (ResNet scripts); auto: fresh for model.arch=resnet, reuse otherwise.
    lower_latents: str = "auto"
    # Opt-in stabiliser, not in the paper: weight of uniform noise images as extra negatives of the
    # upper level (objectives.noise_negatives_term; docs/health.md has its figures). 0: off.
    noise_negatives: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 3e-4  # Adam's learning rate
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])  # Adam's (beta1, beta2)
    weight_decay: float = 1e-4  # Adam's L2 weight decay
    lr_decay: float = 0.998  # multiplied into the LR once per epoch (ExponentialLR)


@dataclass
class TrainConfig:
    batch_size: int = 100  # per process
    max_steps: int = 2000  # bi-level iterations (optimizer steps of each level) to train for
    # auto: what the accelerate launcher says (`--mixed_precision`, its config file; `no` without
    # one); no | bf16 | fp16 win over the launcher. The run's config.yaml holds the resolved value.
    # (A bare `no` is fine: see BARE_NO_KEYS.)
    mixed_precision: str = "auto"
    grad_accum: int = 1  # micro-batches per optimizer step (the step sees grad_accum x batch_size per process)
    channels_last: bool = False  # nets and batches in NHWC memory format (a GPU speed option)
    # torch.compile each level's terms (forward and loss, one graph each, no graph break allowed;
    # AOTAutograd compiles their backward): bidvl.engine.Trainer.level_terms. The fused Adam step
    # is one kernel already and stays eager. Not under DeepSpeed.
    compile: bool = False
    compile_backend: str = "inductor"  # inductor | aot_eager (traced, not code-generated: for checks)
    grad_clip: float = 0.0  # 0: off
    ema: float = 0.0  # generator EMA decay; 0: off (as the authors)
    # Ramp the EMA's decay up from 0.1: min(ema, (1 + k) / (10 + k)) at its k-th update
    # (bidvl.models.ema; diffusers' schedule). Off: the decay is train.ema from the first update.
    ema_warmup: bool = False
    # Stop (checkpoint + export, like reaching max_steps) once training has used this many minutes;
    # 0: off. Counted over data loading + training steps only (not evaluation or checkpoints) and
    # carried across resumes. budget_clock `wall` is elapsed time; `process` is the CPU time of
    # the training process (all its threads, DataLoader workers excluded): equal `process` budgets
    # give runs equal compute even on a shared, loaded machine (launch/study.py uses it with one
    # thread and data.num_workers=0).
    time_budget_min: float = 0.0
    budget_clock: str = "wall"  # wall | process
    # A stop request (SIGTERM, SIGUSR1, Ctrl-C) while the data loader is stalled: one process
    # checkpoints and exits at once; several wait this many seconds for the data (the other ranks
    # may be inside the next step), then exit without a checkpoint (exit 2).
    stop_wait_s: float = 10.0
    # Non-finite loss/gradients skip the optimizer step (always). After `nonfinite_patience`
    # consecutive steps with a skip: `skip` goes on, `stop` ends the run with an error, `rollback`
    # reloads the last complete checkpoint with the LRs scaled by `rollback_lr_scale` once more per
    # rollback (at most
    # `max_rollbacks` times, then stops).
    on_nonfinite: str = "rollback"
    nonfinite_patience: int = 10  # consecutive steps with a skip before on_nonfinite acts
    rollback_lr_scale: float = 0.5  # factor on both LRs per rollback
    max_rollbacks: int = 3  # rollbacks allowed, then the run stops
    energy_optim: OptimConfig = field(  # energy net
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0)
    )
    latent_optim: OptimConfig = field(default_factory=OptimConfig)  # encoder + generator
    # The encoder's weight decay within latent_optim; null: latent_optim.weight_decay. (Han et al.'s
    # Divergence triangle: 0 on the encoder, 5e-4 on the generator.)
    encoder_weight_decay: Optional[float] = None


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (one is also saved at the end and on a stop signal)
    keep: int = 3  # newest complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto | none | PATH
    # A complete checkpoint whose files do not match its manifest (bidvl.checkpoint): `fallback`
    # reports it and resumes from the previous complete one (resume=auto and rollbacks); `stop`
    # ends the run with an error naming the file. A checkpoint.resume=PATH is never replaced.
    on_damaged: str = "fallback"
    # Resuming prints every changed key; changes to the maths (objective.*, optimizer betas) are
    # refused unless this is true (the nets and data shape can never change).
    allow_changes: bool = False


@dataclass
class LogConfig:
    # Accelerate trackers, a comma list (tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive,
    # swanlab, trackio); each must be installed. Empty: none. bidvl.tracking says where each one writes.
    trackers: str = "tensorboard"
    every: int = 10  # steps per logging window (scalars are its means)
    images_every: int = 200  # steps between sample and reconstruction grids
    num_images: int = 64  # images per grid
    # The console (bidvl.tracking.Progress): `bar` (tqdm), `lines` (one plain line per log window,
    # for log files and SLURM .out files), `auto`: a bar when stderr is a terminal, else lines.
    progress: str = "auto"
    # perf/mfu: the device's peak TFLOP/s per process; 0: from bidvl.tracking.PEAK_TFLOPS for the GPUs
    # it knows (H100, H200, A100 at the run's precision), else perf/mfu is not logged (perf/tflops is).
    peak_tflops: float = 0.0


@dataclass
class EvalConfig:
    """Periodic evaluation during training (bidvl.evaluation); every=0 turns it off."""

    every: int = 0  # steps between evaluations during training; 0: off
    metrics: str = "rmse,ood"  # comma list of EVAL_METRICS
    num_samples: int = 1000  # generated samples for FID during training (50,000 in launch/evaluate.py)
    max_test: int = 2000  # test images used for rmse/ood during training (0: all)
    batch_size: int = 100  # images per forward pass of the evaluation
    features: str = ""  # FID feature extractor: "" = Inception (needs inception_weights) or a path
    inception_weights: str = ""  # local file; empty: env BIDVL_INCEPTION_WEIGHTS, else torch's hub cache


@dataclass
class HealthConfig:
    """Run health checks during training (bidvl.health; thresholds and their evidence in
    docs/health.md); every=0 turns them off."""

    every: int = 100  # steps between checks (on the fixed held-out probe); 0: off
    num_images: int = 256  # held-out images, latents and noise images of each kind per check
    warmup: int = 300  # steps before the thresholds apply (only non-finite figures are flagged)
    # Defaults fitted on 4 seeds of the FashionMNIST health study (docs/health.md, health_evidence.md).
    min_spread: float = 0.4  # unhealthy: the samples' pixel spread below this fraction of the data's
    min_nn_ratio: float = 0.4  # unhealthy: nearest-neighbour distance below this fraction of the data's
    max_hf_ratio: float = 3.0  # warning: high-frequency energy above this multiple of the data's
    min_energy_spread: float = 0.01  # unhealthy: the std of E over probe images and samples below this
    min_auroc: float = 0.1  # unhealthy: AUROC of -E(v) against a noise kind below this
    warn_auroc: float = 0.9  # warning: below this
    max_rmse_rise: float = 1.25  # warning: held-out RMSE above this multiple of its best so far
    max_fid_rise: float = 1.5  # warning: small-n FID-style score above this multiple of its best
    # What an unhealthy verdict, `patience` checks in a row, does: `warn` (say so, go on), `stop`
    # (checkpoint and end the run with an error), `restart` (reload the newest checkpoint whose
    # check was healthy and go on with a new noise seed; at most max_restarts times, then stop).
    on_unhealthy: str = "warn"
    patience: int = 2  # unhealthy checks in a row before on_unhealthy acts
    max_restarts: int = 2  # with on_unhealthy=restart: restarts allowed, then the run stops


@dataclass
class Config:
    """The whole config; SECTIONS says what each section holds (launch/train.py --help prints it;
    --help-config and docs/config.md list every key: bidvl.config_reference)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


SECTIONS = {
    "run": "the run folder (run.dir) and the seed",
    "data": "shard folders and splits, resolution and channels, loader workers, bad-data policy",
    "model": "the three nets: architecture, latent size, widths, energy output, spectral norm",
    "objective": "bidvl or a baseline; latent term, importance ratio, upper loss, N, phase order",
    "train": "batch, steps, precision, optimizers and LR decay, clipping, EMA, budgets, NaN policy",
    "checkpoint": "how often, how many to keep, what to resume, what to do with a damaged one",
    "log": "trackers (TensorBoard, W&B, MLflow, ...), scalars and image grids: how often, how many",
    "eval": "evaluation during training: how often, which metrics, how many samples",
    "health": "run health checks during training: how often, thresholds, what an unhealthy run does",
}


EVAL_METRICS = ("fid", "rmse", "ood")  # the evaluation suite's metric names (bidvl.evaluation)

# Allowed values per key; the registries that act on a value own its list.
CHOICES = {
    "model.arch": tuple(BUILDERS),
    "model.energy_output": ENERGY_OUTPUTS,
    "objective.name": tuple(OBJECTIVES),
    "objective.latent_term": ("offset", "not_offset", "none"),
    "train.budget_clock": ("wall", "process"),
    "objective.ratio_bias": ("none", "sigmoid"),
    "objective.upper_loss": ("difference", "hinge"),
    "objective.order": ("upper_first", "lower_first"),
    "objective.latent_reduction": ("auto", "mean", "sum_over_dims"),
    "objective.lower_latents": ("auto", "reuse", "fresh"),
    "model.init": ("auto", "normal", "xavier", "triangle"),
    "model.encoder_heads": ("auto", "bias", "no_bias"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "data.on_error": ("raise", "skip"),
    "data.crop": ("center", "random"),
    "checkpoint.on_damaged": ("fallback", "stop"),
    "train.on_nonfinite": ("skip", "rollback", "stop"),
    "train.compile_backend": ("inductor", "aot_eager"),
    "health.on_unhealthy": ("warn", "stop", "restart"),
    "log.progress": ("auto", "bar", "lines"),
}


class Range(NamedTuple):
    """What a numeric or text option accepts: a test and the words an error message uses."""

    expected: str
    accepts: Callable[[Any], bool]

    def check(self, name: str, value, joiner: str = "=") -> None:
        """Raises ConfigError `name=value: expected ...` (CLI options: joiner " ")."""
        if not self.accepts(value):
            raise ConfigError(f"{name}{joiner}{value!r}: expected {self.expected}")


# Sizes, counts and seeds stay below 2**31: torch takes them as tensor sizes, and numpy's seed
# (< 2**32) must still hold run.seed + the process index that Accelerate's set_seed adds.
INT_LIMIT = 2**31


def integers(low: int) -> Range:
    return Range(f"an integer in [{low}, 2**31)", lambda v: low <= v < INT_LIMIT)


def path_problem(path: str, kind: str = "folder", writable: bool = False) -> Optional[str]:
    """Why `path` cannot be (or become) a `kind` ("folder" or "file"), or None when it can: it is
    empty, it exists as the other kind, one of its parents is a file, or (`writable`) the nearest
    existing one of them is not writable. Nothing is created."""
    if not str(path).strip():
        return "the path is empty"
    if kind == "file" and str(path).endswith(("/", os.sep)):
        return f"{path} ends in a separator, expected a file name"
    path = Path(path)
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
        if existing == path and existing.is_dir() != (kind == "folder"):
            return f"{path} is a {'folder' if existing.is_dir() else 'file'}, expected a {kind}"
        if existing != path and not existing.is_dir():
            return f"{existing} is a file, not a folder"
        if writable and not os.access(existing, os.W_OK):
            return f"{existing} is not writable"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None


# Accelerate's tracker names (accelerate.utils.LoggerType); bidvl.tracking checks that each is installed.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


def _tracker_list(text: str) -> bool:
    names = [m.strip() for m in text.split(",") if m.strip()]
    return all(m in TRACKERS for m in names) and len(names) == len(set(names))


def _metric_list(text: str) -> bool:
    names = [m.strip() for m in text.split(",") if m.strip()]
    return not text.strip() or (bool(names) and all(m in EVAL_METRICS for m in names))


COUNT = integers(1)  # sizes, steps, intervals
COUNT_OR_ZERO = integers(0)  # where 0 means none, off or all
SEED = integers(0)
POSITIVE = Range("a finite number > 0", lambda v: math.isfinite(v) and v > 0)
NON_NEGATIVE = Range("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
FACTOR = Range("a number in (0, 1]", lambda v: 0 < v <= 1)  # scales an LR down, or keeps it
DECAY = Range("a number in [0, 1)", lambda v: 0 <= v < 1)  # an average's decay rate
NOT_EMPTY = Range("a non-empty string", lambda v: bool(v.strip()))
OPTIMIZER = {
    "lr": POSITIVE,
    "betas": Range("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    "weight_decay": NON_NEGATIVE,
    "lr_decay": FACTOR,
}

# The range of every option that has one (CHOICES holds the named values; booleans need none;
# `validate` adds the checks that involve two keys). A new option is one line here.
RANGES: dict[str, Range] = {
    "run.dir": Range("a folder path (not empty, not a file, no file among its parents)",
                     lambda v: path_problem(v, "folder") is None),
    "run.seed": SEED,
    "data.train": NOT_EMPTY,
    "data.train_split": NOT_EMPTY,
    "data.test_split": NOT_EMPTY,
    "data.resolution": COUNT,  # and one that model.arch supports (validate)
    "data.channels": Range("1 or 3", lambda v: v in (1, 3)),
    "data.num_workers": COUNT_OR_ZERO,
    "data.shuffle_buffer": COUNT,
    "data.max_skipped": COUNT_OR_ZERO,
    "data.train_count": COUNT_OR_ZERO,  # 0: from meta.json
    "data.net_retries": COUNT_OR_ZERO,
    "data.net_backoff": NON_NEGATIVE,
    "data.net_timeout": POSITIVE,
    "data.net_shard_timeout": POSITIVE,
    "train.stop_wait_s": POSITIVE,
    "log.peak_tflops": NON_NEGATIVE,
    "model.latent_dim": COUNT,
    "model.energy_width": COUNT,
    "model.encoder_width": COUNT,
    "model.generator_width": COUNT,
    "objective.w_latent": NON_NEGATIVE,
    "objective.r_basic": NON_NEGATIVE,
    "objective.lower_steps": COUNT,
    "objective.noise_negatives": NON_NEGATIVE,
    "train.batch_size": COUNT,
    "train.max_steps": COUNT,
    "train.grad_accum": COUNT,
    "train.grad_clip": NON_NEGATIVE,  # 0: off
    "train.ema": DECAY,  # 0: off
    "train.time_budget_min": NON_NEGATIVE,  # 0: off
    "train.nonfinite_patience": COUNT,
    "train.rollback_lr_scale": FACTOR,
    "train.max_rollbacks": COUNT_OR_ZERO,
    "train.encoder_weight_decay": Range("null or a finite number >= 0",
                                        lambda v: v is None or (math.isfinite(v) and v >= 0)),
    **{f"train.{optimizer}.{key}": accepted for optimizer in ("energy_optim", "latent_optim")
       for key, accepted in OPTIMIZER.items()},
    "checkpoint.every": COUNT,
    "checkpoint.keep": COUNT,
    "checkpoint.resume": Range("auto, none or a checkpoint path", lambda v: bool(v.strip())),
    "log.trackers": Range(f"a comma list of {', '.join(TRACKERS)} without repeats (or empty: none)", _tracker_list),
    "log.every": COUNT,
    "log.images_every": COUNT,
    "log.num_images": COUNT,
    "eval.every": COUNT_OR_ZERO,  # 0: off
    "eval.metrics": Range(f"a comma list of {', '.join(EVAL_METRICS)} (or empty)", _metric_list),
    "eval.num_samples": integers(2),  # FID needs two samples
    "eval.max_test": COUNT_OR_ZERO,  # 0: all
    "eval.batch_size": COUNT,
    "health.every": COUNT_OR_ZERO,  # 0: off
    # pairwise distances of the samples (and of features) are num_images^2 doubles: 512 MiB at 8192
    "health.num_images": Range("an integer in [8, 8192]", lambda v: 8 <= v <= 8192),
    "health.warmup": COUNT_OR_ZERO,
    "health.min_spread": NON_NEGATIVE,
    "health.min_nn_ratio": NON_NEGATIVE,
    "health.min_energy_spread": NON_NEGATIVE,
    "health.max_hf_ratio": POSITIVE,
    "health.min_auroc": Range("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "health.warn_auroc": Range("a number in [0, 1]", lambda v: 0 <= v <= 1),  # and >= min_auroc (validate)
    "health.max_rmse_rise": Range("a finite number >= 1", lambda v: math.isfinite(v) and v >= 1),
    "health.max_fid_rise": Range("a finite number >= 1", lambda v: math.isfinite(v) and v >= 1),
    "health.patience": COUNT,
    "health.max_restarts": COUNT_OR_ZERO,
}


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# YAML 1.1, which OmegaConf parses, reads a bare `no` as the boolean false, and a str field keeps
# it as "False". These keys take `no` as a value, so load_config reads their "False" back as "no":
# `train.mixed_precision=no` works unquoted in a file and on the command line, and the stored value
# is always "no".
BARE_NO_KEYS = ("train.mixed_precision",)


def _bare_no_as_no(cfg: Config) -> Config:
    for key in BARE_NO_KEYS:
        section, name = key.rsplit(".", 1)
        if getattr(_get(cfg, section), name) == "False":
            setattr(_get(cfg, section), name, "no")
    return cfg


def validate(cfg: Config) -> Config:
    """Checks that types cannot express; raises ConfigError naming the key and the value."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    for key, accepted in RANGES.items():
        accepted.check(key, _get(cfg, key))
    if cfg.health.warn_auroc < cfg.health.min_auroc:
        raise ConfigError(f"health.warn_auroc={cfg.health.warn_auroc!r}: expected >= health.min_auroc="
                          f"{cfg.health.min_auroc!r} (a warning comes before unhealthy)")
    if cfg.health.on_unhealthy == "restart" and cfg.health.every and cfg.checkpoint.every % cfg.health.every:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every}: with health.on_unhealthy=restart it must "
                          f"be a multiple of health.every={cfg.health.every} (a restart goes back to a "
                          f"checkpoint whose own check was healthy)")
    supported = RESOLUTIONS[cfg.model.arch]
    if cfg.data.resolution not in supported:
        raise ConfigError(f"data.resolution={cfg.data.resolution}: model.arch={cfg.model.arch} supports "
                          f"{', '.join(map(str, supported))}")
    if cfg.model.arch == "timm":
        from bidvl.extras import require

        timm = require("timm", ConfigError)

        if not cfg.model.timm_name:
            raise ConfigError("model.timm_name is empty: model.arch=timm needs a timm model name")
        if not timm.is_model(cfg.model.timm_name):
            raise ConfigError(f"model.timm_name={cfg.model.timm_name!r}: not a model timm knows "
                              "(timm.list_models() lists them)")
    if cfg.data.auto_build:
        from bidvl.data.build import DATASETS  # here: bidvl.data imports this module

        if cfg.data.auto_build not in DATASETS:
            raise ConfigError(f"data.auto_build={cfg.data.auto_build!r}: expected empty or one of "
                              f"{', '.join(DATASETS)}")
    return cfg


# What YAML and OmegaConf raise for a file or an override they cannot read, convert or merge.
_UNREADABLE = (OmegaConfBaseException, yaml.YAMLError, OSError, TypeError, ValueError, OverflowError)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # package data; `configs/` in the clone links here


def shipped_configs() -> list[str]:
    """The names of the configs that come with bidvl (`--config cifar10`)."""
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def path_or_shipped(name: str | Path, folder: Path) -> Path | None:
    """`name` when it is a file here, else, for a bare name (`cifar10`, `cifar10.yaml`), the
    shipped `folder/<name>.yaml` when it exists; None when neither is."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = folder / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return shipped if len(path.parts) == 1 and shipped.is_file() else None


def config_file(name: str | Path) -> Path:
    """A config file path, or the name of a shipped config (`cifar10`, `cifar10.yaml`) when no
    such file exists here; a ConfigError naming both otherwise."""
    found = path_or_shipped(name, SHIPPED_CONFIGS)
    if found is None:
        raise ConfigError(f"config file {name} does not exist (shipped configs, by name: "
                          f"{', '.join(shipped_configs())})")
    return found


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple = ()) -> Config:
    """defaults <- YAML file (a path or a shipped config's name) <- `key=value` overrides,
    type-checked and validated."""
    merged = OmegaConf.structured(Config)
    sources = []
    if path is not None:
        path = config_file(path)
        try:
            sources.append((str(path), "?", OmegaConf.load(path)))
        except _UNREADABLE as exc:
            raise ConfigError(f"config file {path}: not readable as YAML ({_first_line(exc)})") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
        try:
            key = item.split("=", 1)[0] or "?"
            sources.append(("command line", key, OmegaConf.from_dotlist([item])))
        except _UNREADABLE as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_first_line(exc)}); "
                              "quote it") from None
    for where, key, src in sources:
        try:
            merged = OmegaConf.merge(merged, src)
        except _UNREADABLE as exc:
            key = getattr(exc, "full_key", None) or key
            raise ConfigError(f"{where}: key {key}: {_first_line(exc)}") from None
    cfg = _bare_no_as_no(OmegaConf.to_object(merged))
    # A data.train typed on the command line names a folder the user expects to hold shards (or a
    # remote source): the config file's auto_build is not carried over to it, so a typo is an error
    # rather than a silent build in a new folder. Typing data.auto_build too keeps the build.
    typed = {key for where, key, _ in sources if where == "command line"}
    if "data.train" in typed and "data.auto_build" not in typed:
        cfg.data.auto_build = ""
    return validate(cfg)


# ---------------------------------------------------------------- `auto`, resolved once

# A run whose config.yaml predates a key ran LEGACY's value (the code before the key existed).
LEGACY = {"objective.latent_reduction": "mean", "objective.lower_latents": "reuse", "model.encoder_heads": "bias"}
# Keys whose `auto` follows from model.arch (and data.resolution), by their owners' rules.
ARCH_AUTO = ("model.init", "model.encoder_heads", "objective.latent_reduction", "objective.lower_latents")


def resolve_precision(cfg: Config) -> str:
    """train.mixed_precision with `auto` replaced by the launcher's (ACCELERATE_MIXED_PRECISION,
    which `accelerate launch --mixed_precision` and its config files set; `no` without one). An
    explicit value wins, with a warning when the launcher asked for another."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if cfg.train.mixed_precision == "auto":
        if launcher not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision=auto: the accelerate launcher asks for "
                              f"mixed_precision={launcher}, expected no, bf16 or fp16")
        return launcher
    if launcher not in ("no", cfg.train.mixed_precision):
        warnings.warn(f"the accelerate launcher asks for mixed_precision={launcher} but "
                      f"train.mixed_precision={cfg.train.mixed_precision} is used (an explicit value wins; "
                      f"train.mixed_precision=auto follows the launcher)", stacklevel=3)
    return cfg.train.mixed_precision


def resolve(cfg: Config, written=None, launcher: bool = True) -> Config:
    """A copy of `cfg` with every `auto` that stands for a value replaced by it, the one place this
    happens before anything is built (the trainer's config.yaml then says what ran):
    model.init and model.encoder_heads (bidvl.models.registry's rules per arch and resolution),
    objective.latent_reduction and objective.lower_latents (bidvl.objectives.auto_settings), and,
    with `launcher`, train.mixed_precision (the accelerate launcher's, `resolve_precision`).
    `written`: the dotted keys a saved config.yaml holds; a LEGACY key it lacks takes the value the
    code before the key ran. `checkpoint.resume=auto` (what to resume) and `log.progress=auto`
    (whether stderr is a terminal) are modes, not values: they stay as typed. Resolving twice
    changes nothing; `cfg` itself is never changed."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model), objective=dataclasses.replace(cfg.objective),
                              train=dataclasses.replace(cfg.train))
    out.model.init = resolved_init(cfg.model)
    out.model.encoder_heads = "bias" if encoder_head_bias(cfg.model, cfg.data.resolution) else "no_bias"
    for key, value in auto_settings(cfg.objective, cfg.model.arch).items():
        setattr(out.objective, key, value)
    if written is not None:
        for key, value in LEGACY.items():
            if key not in written:
                section, name = key.split(".")
                setattr(getattr(out, section), name, value)
    if launcher:
        out.train.mixed_precision = resolve_precision(cfg)
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {dotted key: scalar or str} (trackers' hparams, resume diffs)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
