"""Processes and precision: the Accelerator the engine runs on, DeepSpeed's two engines, and the
per-step flags every rank must agree on.

DeepSpeed in Accelerate takes one trained model per engine; the lower level back-propagates
through the energy net into the generator, so the engine builds two DeepSpeed engines (Accelerate's
multi-plugin API): one for the energy net, one for encoder + generator (`LatentNets`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

from . import objectives
from .config import Config, ConfigError
from .run_dir import RunDir
from .tracking import tracker_environment, tracker_names


class LatentNets(torch.nn.Module):
    """Encoder + generator as one module: the one model of the lower level's DeepSpeed engine."""

    def __init__(self, encoder: torch.nn.Module, generator: torch.nn.Module):
        super().__init__()
        self.encoder, self.generator = encoder, generator


def end_with_the_launcher() -> None:
    """A rank started by a launcher (`accelerate launch`, torchrun: LOCAL_RANK is set) gets SIGTERM
    from the kernel when its launcher dies (prctl PR_SET_PDEATHSIG, Linux): torch's launcher starts
    each rank in a session of its own, so a launcher killed with SIGKILL (an OOM killer, a hard
    `kill -9`, a dead SLURM step) left the ranks running as orphans, waiting on each other until the
    collective timeout. SIGTERM is the job's normal stop signal here: the ranks checkpoint and exit."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def deepspeed_plugins(cfg: Config) -> dict | None:
    """Two DeepSpeed plugins (energy net; encoder + generator) when the accelerate launcher asks
    for DeepSpeed (ACCELERATE_USE_DEEPSPEED), else None.

    Supported: ZeRO stages 1 and 2, fp32 and bf16. Refused with a ConfigError: stage 0 (DeepSpeed
    refuses the direct engine.backward the engine needs), stage 3 (parameters are partitioned, so
    calling the frozen energy net through its detached parameters in the lower level does not
    work), fp16 (use bf16) and objective.latent_term=not_offset (its upper level steps the encoder
    alone, which a flat ZeRO optimizer over encoder + generator cannot do: it would move the
    generator by Adam momentum), and train.compile (not supported with DeepSpeed's engines).
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None

    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    where = "the accelerate config's deepspeed_config"
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed zero_stage={stage} ({where}): expected 1 or 2 (see bidvl/distributed.py)")
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 under DeepSpeed: use bf16 (or no)")
    if cfg.train.compile:
        raise ConfigError("train.compile=true under DeepSpeed: not supported (a compiled level would "
                          "call DeepSpeed's engine inside the graph); use DDP to compile")
    problem = objectives.build(cfg).deepspeed_problem()
    if problem:
        raise ConfigError(problem)
    accum = int(os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", cfg.train.grad_accum))
    if accum != cfg.train.grad_accum:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} but {where} has "
                          f"gradient_accumulation_steps={accum}: make them equal")
    plugins = {}
    for name in ("energy", "latent"):
        plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=cfg.train.grad_accum,
                                 gradient_clipping=float(cfg.train.grad_clip))
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        # Explicitly: the plugin turns 0 into "auto", which Accelerate fills with clipping at 1.0.
        plugin.deepspeed_config["gradient_clipping"] = float(cfg.train.grad_clip)
        plugin.deepspeed_config["steps_per_print"] = 2**31 - 1  # we log ourselves
        plugins[name] = plugin
    return plugins


def make_accelerator(cfg: Config, plugins: dict | None) -> Accelerator:
    """The run's Accelerator: precision from train.mixed_precision (resolved: see
    bidvl.config.resolve), the trackers of log.trackers (TensorBoard under run.dir/tensorboard)."""
    run_dir = Path(cfg.run.dir)
    trackers = tracker_names(cfg)
    tracker_environment(cfg, trackers)
    on_cpu = not torch.cuda.is_available()  # DeepSpeed on the CPU (tests) needs gloo
    return Accelerator(
        deepspeed_plugins=plugins,
        mixed_precision=cfg.train.mixed_precision,
        dynamo_backend="no",  # train.compile compiles the levels' terms (Trainer.level_terms), not the nets
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(RunDir(run_dir).tensorboard)),
        kwargs_handlers=[
            # Nets run twice before one backward (G on h_q and h_p): buffers must not be
            # re-broadcast in between.
            DistributedDataParallelKwargs(broadcast_buffers=False),
            InitProcessGroupKwargs(timeout=timedelta(minutes=30),
                                   backend="gloo" if on_cpu and plugins is not None else None),
        ],
    )


class PreparedNets(NamedTuple):
    energy_net: torch.nn.Module  # DDP-wrapped, or DeepSpeed's engine for the energy net
    encoder: torch.nn.Module
    generator: torch.nn.Module
    energy_opt: torch.optim.Optimizer
    latent_opt: torch.optim.Optimizer  # encoder + generator
    latent_engine: torch.nn.Module | None  # DeepSpeed's engine for encoder + generator


def build_optimizers(cfg: Config, energy_net, encoder, generator):
    """Adam for the energy net; one Adam for encoder + generator (the lower level's nets), the
    encoder in a group of its own when train.encoder_weight_decay is set.

    Both are torch's fused Adam (one kernel for all of an optimizer's tensors), which takes the
    skip decision as a device tensor (`found_inf`, as GradScaler passes it), so a non-finite step
    is skipped without the host reading anything (`step_optimizer`). Its update equals the default
    implementation's to round-off (bit-equal in float64, tests/test_equivalence.py). DeepSpeed's
    ZeRO optimizer wraps it too (on its flat fp32 partitions), so DDP and ZeRO runs take the same
    updates (tests/test_deepspeed.py)."""
    eo, lo = cfg.train.energy_optim, cfg.train.latent_optim
    energy_opt = torch.optim.Adam(energy_net.parameters(), lr=eo.lr, betas=tuple(eo.betas),
                                  weight_decay=eo.weight_decay, fused=True)
    latent_params = [*encoder.parameters(), *generator.parameters()]
    if cfg.train.encoder_weight_decay is not None:  # a group of its own for the encoder
        latent_params = [{"params": list(encoder.parameters()), "weight_decay": cfg.train.encoder_weight_decay},
                         {"params": list(generator.parameters())}]
    latent_opt = torch.optim.Adam(latent_params, lr=lo.lr, betas=tuple(lo.betas), weight_decay=lo.weight_decay,
                                  fused=True)
    return energy_opt, latent_opt


def prepare_nets(accelerator, cfg: Config, nets, deepspeed: bool) -> PreparedNets:
    """SyncBatchNorm and channels_last as configured, the optimizers (`build_optimizers`), then
    Accelerate's prepare in the fixed order energy net,
    encoder, generator, energy optimizer, latent optimizer (checkpoint file names follow it)."""
    energy_net, encoder, generator = nets
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            raise ConfigError("model.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm refuses "
                              "CPU tensors (set model.sync_batchnorm=false on the CPU)")
        encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
    if cfg.train.channels_last:
        for net in (energy_net, encoder, generator):
            net.to(memory_format=torch.channels_last)
    energy_opt, latent_opt = build_optimizers(cfg, energy_net, encoder, generator)
    if not deepspeed:
        return PreparedNets(*accelerator.prepare(energy_net, encoder, generator, energy_opt, latent_opt), None)
    # One engine per optimizer. Under ZeRO-1/2 the encoder's and generator's parameters are whole
    # on every rank and the engine's gradient hooks fire whoever calls them, so the engine calls
    # them directly.
    accelerator.state.select_deepspeed_plugin("energy")
    energy_net, energy_opt = accelerator.prepare(energy_net, energy_opt)
    accelerator.state.select_deepspeed_plugin("latent")
    latent_engine, latent_opt = accelerator.prepare(LatentNets(encoder, generator), latent_opt)
    return PreparedNets(energy_net, encoder, generator, energy_opt, latent_opt, latent_engine)


def cast_buffers_to_bf16(nets) -> None:
    """DeepSpeed's bf16 casts parameters but leaves buffers (BatchNorm statistics, spectral-norm
    vectors) in fp32, which BatchNorm and spectral norm refuse."""
    for net in nets:
        for module in net.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(module, name, buf.to(torch.bfloat16))


def step_optimizer(accelerator, optimizer, params, max_norm: float, deepspeed_engine=None):
    """Clip (or just measure), step unless the gradients are not finite, zero. Returns three device
    tensors: the gradient norm, whether the step was skipped (0/1) and whether the gradient was
    non-finite (0/1). Nothing is read on the host (bidvl.nonfinite reads the counts at the log,
    evaluation and checkpoint steps), so a GPU never waits for the host here.

    The skip is decided on the device: `found_inf` = the norm is not finite, handed to the fused
    Adam (`build_optimizers`), which then leaves the parameters, its moments and its step count as
    they were. Gradients are identical on every rank after the all-reduce, so every rank skips
    alike. fp16: Accelerate unscales before clipping and the shared GradScaler hands the fused Adam
    its own found_inf (any gradient not finite after unscaling, i.e. the same norm test); such a
    step counts as skipped, not as non-finite. DeepSpeed: engine.step() clips (gradient_clipping =
    train.grad_clip), steps and zeroes, and its global norm is a host float (DeepSpeed reads it); a
    non-finite norm is seen only afterwards, so that step is not skipped, but it is counted like a
    skipped one and drives train.on_nonfinite.
    """
    device = accelerator.device
    if deepspeed_engine is not None:
        deepspeed_engine.step()
        norm = deepspeed_engine.get_global_grad_norm()
        norm = torch.tensor(float("nan") if norm is None else float(norm), device=device)
        nonfinite = ~torch.isfinite(norm)
        return norm, nonfinite, nonfinite
    fp16 = accelerator.mixed_precision == "fp16"
    if max_norm > 0 or fp16:
        norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    else:  # only measured: no multiplication of every gradient by 1
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = torch.as_tensor(norm, device=device).detach().float()  # (a CPU 0 when no gradient exists)
    skipped = ~torch.isfinite(norm)
    inner = getattr(optimizer, "optimizer", optimizer)  # torch's Adam inside Accelerate's wrapper
    if not fp16:  # (under fp16 the GradScaler sets its own found_inf for the step)
        inner.found_inf = skipped.float()
    try:
        optimizer.step()
    finally:
        inner.__dict__.pop("found_inf", None)
    optimizer.zero_grad(set_to_none=True)
    return norm, skipped, torch.zeros_like(skipped) if fp16 else skipped


class StepFlags(NamedTuple):
    stop: bool  # any rank received a stop signal (SIGTERM, SIGUSR1, SIGINT)
    skipped_samples: int  # bad samples or shards skipped so far, summed over ranks
    over_budget: bool  # any rank has used up train.time_budget_min


class HostFlags:
    """The per-step flags every rank must agree on (a stop signal, skipped samples, the time
    budget), combined over ranks at every step on the host: a CPU tensor all-reduced in a gloo
    process group of its own, so the agreement never waits for the GPU (a device all-reduce read
    back every step would empty the GPU's queue at each one). One process: no collective at all.

    The group is made once, by every rank (new_group is collective), when the trainer is built. On
    a cluster, gloo connects the ranks over TCP like the launcher's store; where it picks the wrong
    network interface, set GLOO_SOCKET_IFNAME as for any gloo group."""

    def __init__(self, accelerator):
        self.processes = accelerator.num_processes
        self.group = torch.distributed.new_group(backend="gloo") if self.processes > 1 else None

    def agree(self, stop: bool, skipped_samples: int, over_budget: bool) -> StepFlags:
        flags = [float(stop), float(skipped_samples), float(over_budget)]
        if self.processes > 1:
            tensor = torch.tensor(flags, dtype=torch.float64)
            torch.distributed.all_reduce(tensor, group=self.group)
            flags = tensor.numpy().tolist()  # host memory (numpy refuses a device tensor)
        return StepFlags(flags[0] > 0, int(flags[1]), flags[2] > 0)
