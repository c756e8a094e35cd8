"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

A config file only holds values; every key it may hold is declared here with its type and default.
`load_config(path, overrides)` merges defaults <- YAML <- `key=value` overrides through OmegaConf's
structured configs, so an unknown key or a value of the wrong type fails before anything is built,
with the dotted key in the message. `validate` then checks values that types cannot express.

Defaults are the authors' DCGAN settings at 32 px (their public code; the README's table of configs
names the settings each file follows): a config file only states what differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bidvl.models.registry import BUILDERS, ENERGY_OUTPUTS
from bidvl.objectives import OBJECTIVES


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible; the message names the key."""


@dataclass
class RunConfig:
    dir: str = "runs/digits"
    seed: int = 0


@dataclass
class DataConfig:
    # Shard folders (each with meta.json). `auto_build` lets the default config build its own
    # shards on first use (only for sources that ship with a package: digits, fashion-mnist).
    train: str = "shards/digits"
    test: str = ""  # empty: same folder as `train`, split `test_split`
    train_split: str = "train"
    test_split: str = "test"
    auto_build: str = ""  # dataset name to build into `train` when it has no meta.json yet
    resolution: int = 32  # must equal the shards' meta.json
    channels: int = 1  # must equal the shards' meta.json
    num_workers: int = 1  # DataLoader workers per process
    shuffle_buffer: int = 2000
    on_error: str = "raise"  # raise | skip: bad samples/shards stop the run, or are skipped and counted
    max_skipped: int = 100  # with on_error=skip: stop once more than this many were skipped


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # a key of bidvl.models.registry.BUILDERS
    latent_dim: int = 100
    energy_width: int = 64
    encoder_width: int = 48
    generator_width: int = 48
    energy_output: str = "softplus"  # softplus | identity
    spectral_norm: bool = True  # on the energy net (and the timm backbone when arch=timm)
    timm_name: str = ""  # arch=timm: timm backbone for energy net and encoder; generator is dcgan
    sync_batchnorm: bool = False  # convert BatchNorm to SyncBatchNorm under DDP


@dataclass
class ObjectiveConfig:
    # bidvl | vae | divergence_triangle. The baselines run in the same engine: `vae` trains encoder
    # + generator on the negative ELBO only (energy net untouched); `divergence_triangle` (Han et
    # al. 2019) trains the energy net with the `difference` upper loss and encoder + generator on
    # recon + KL + E(G(h)) + w_latent x latent NLL (Han et al.: w_latent=0.1, see objectives.py).
    name: str = "bidvl"
    latent_term: str = "offset"  # offset | not_offset | none (bidvl only)
    w_latent: float = 1.0
    r_basic: float = 0.05  # r' in the paper
    ratio_bias: str = "none"  # none | sigmoid
    upper_loss: str = "difference"  # difference | hinge
    lower_steps: int = 1  # N
    order: str = "upper_first"  # upper_first (authors' code) | lower_first (Algorithm 1)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])
    weight_decay: float = 1e-4
    lr_decay: float = 0.998  # multiplied into the LR once per epoch (ExponentialLR)


@dataclass
class TrainConfig:
    batch_size: int = 100  # per process
    max_steps: int = 2000
    mixed_precision: str = "no"  # no | bf16 | fp16 (a bare `no` is fine: see BARE_NO_KEYS)
    grad_accum: int = 1
    channels_last: bool = False  # nets and batches in NHWC memory format (a GPU speed option)
    compile: bool = False  # torch.compile each trained net (Accelerate's dynamo backend, inductor)
    grad_clip: float = 0.0  # 0: off
    ema: float = 0.0  # generator EMA decay; 0: off (as the authors)
    # Stop (checkpoint + export, like reaching max_steps) once training has used this many minutes;
    # 0: off. Counted over data loading + training steps only (not evaluation or checkpoints) and
    # carried across resumes. budget_clock `wall` is elapsed time; `process` is the CPU time of
    # the training process (all its threads, DataLoader workers excluded): equal `process` budgets
    # give runs equal compute even on a shared, loaded machine (launch/study.py uses it with one
    # thread and data.num_workers=0).
    time_budget_min: float = 0.0
    budget_clock: str = "wall"  # wall | process
    # Non-finite loss/gradients skip the optimizer step (always). After `nonfinite_patience`
    # consecutive steps with a skip: `skip` goes on, `stop` ends the run with an error, `rollback`
    # reloads the last complete checkpoint with the LRs scaled by `rollback_lr_scale` (at most
    # `max_rollbacks` times, then stops).
    on_nonfinite: str = "rollback"
    nonfinite_patience: int = 10
    rollback_lr_scale: float = 0.5
    max_rollbacks: int = 3
    energy_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0)
    )
    latent_optim: OptimConfig = field(default_factory=OptimConfig)  # encoder + generator


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    resume: str = "auto"  # auto | none | PATH


@dataclass
class LogConfig:
    every: int = 10
    images_every: int = 200
    num_images: int = 64


@dataclass
class EvalConfig:
    """Periodic evaluation during training (bidvl.evaluation); every=0 turns it off."""

    every: int = 0
    metrics: str = "rmse,ood"  # comma list of EVAL_METRICS
    num_samples: int = 1000  # generated samples for FID during training (50,000 in launch/evaluate.py)
    max_test: int = 2000  # test images used for rmse/ood during training (0: all)
    batch_size: int = 100
    features: str = ""  # FID feature extractor: "" = Inception (needs inception_weights) or a path
    inception_weights: str = ""  # local file; env BIDVL_INCEPTION_WEIGHTS is used when empty


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "data.on_error": ("raise", "skip"),
    "train.on_nonfinite": ("skip", "rollback", "stop"),
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
    positive = [
        "train.batch_size", "train.max_steps", "train.grad_accum", "objective.lower_steps",
        "model.latent_dim", "data.resolution", "data.channels", "checkpoint.every",
        "checkpoint.keep", "log.every", "log.images_every", "model.energy_width",
        "model.encoder_width", "model.generator_width", "data.shuffle_buffer",
    ]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)}: expected a positive integer")
    if cfg.eval.every < 0 or cfg.eval.num_samples <= 0 or cfg.eval.batch_size <= 0 or cfg.eval.max_test < 0:
        raise ConfigError(
            f"eval.every={cfg.eval.every}, eval.num_samples={cfg.eval.num_samples}, "
            f"eval.batch_size={cfg.eval.batch_size}, eval.max_test={cfg.eval.max_test}: "
            "expected every >= 0, num_samples > 0, batch_size > 0, max_test >= 0"
        )
    for metric in filter(None, cfg.eval.metrics.split(",")):
        if metric.strip() not in EVAL_METRICS:
            raise ConfigError(f"eval.metrics={cfg.eval.metrics!r}: {metric!r} is not one of "
                              f"{', '.join(EVAL_METRICS)}")
    if cfg.train.nonfinite_patience <= 0 or cfg.train.max_rollbacks < 0 or cfg.data.max_skipped < 0:
        raise ConfigError(
            f"train.nonfinite_patience={cfg.train.nonfinite_patience}, train.max_rollbacks="
            f"{cfg.train.max_rollbacks}, data.max_skipped={cfg.data.max_skipped}: expected > 0, >= 0, >= 0"
        )
    if not 0.0 < cfg.train.rollback_lr_scale <= 1.0:
        raise ConfigError(f"train.rollback_lr_scale={cfg.train.rollback_lr_scale}: expected in (0, 1]")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers}: expected >= 0")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels={cfg.data.channels}: expected 1 or 3")
    for name in ("energy_optim", "latent_optim"):
        opt = getattr(cfg.train, name)
        if opt.lr <= 0:
            raise ConfigError(f"train.{name}.lr={opt.lr}: expected > 0")
        if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
            raise ConfigError(f"train.{name}.betas={list(opt.betas)}: expected two values in [0, 1)")
        if not 0.0 < opt.lr_decay <= 1.0:
            raise ConfigError(f"train.{name}.lr_decay={opt.lr_decay}: expected in (0, 1]")
    if cfg.objective.r_basic < 0:
        raise ConfigError(f"objective.r_basic={cfg.objective.r_basic}: expected >= 0")
    if cfg.train.time_budget_min < 0:
        raise ConfigError(f"train.time_budget_min={cfg.train.time_budget_min}: expected >= 0 (0 disables)")
    if cfg.objective.w_latent < 0:
        raise ConfigError(f"objective.w_latent={cfg.objective.w_latent}: expected >= 0")
    if not 0.0 <= cfg.train.ema < 1.0:
        raise ConfigError(f"train.ema={cfg.train.ema}: expected in [0, 1)")
    if cfg.train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={cfg.train.grad_clip}: expected >= 0 (0 disables)")
    if cfg.model.arch == "timm" and not cfg.model.timm_name:
        raise ConfigError("model.timm_name is empty: model.arch=timm needs a timm model name")
    if cfg.checkpoint.resume not in ("auto", "none") and not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume is empty: expected auto, none or a checkpoint path")
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: list[str] | tuple = ()) -> Config:
    """defaults <- YAML file <- `key=value` overrides, type-checked and validated."""
    merged = OmegaConf.structured(Config)
    sources = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        sources.append((str(path), OmegaConf.load(path)))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=100")
    if overrides:
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    for where, src in sources:
        try:
            merged = OmegaConf.merge(merged, src)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            first = str(exc).splitlines()[0]
            raise ConfigError(f"{where}: key {key}: {first}") from None
    return validate(_bare_no_as_no(OmegaConf.to_object(merged)))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
