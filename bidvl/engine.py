"""The bi-level training engine: phases, freezing, precision, checkpoints, logging.

One `Trainer` owns the three nets (prepared by Accelerate in the fixed order energy_net, encoder,
generator, energy optimizer, latent optimizer) and runs, per batch, one upper-level step and N
lower-level steps (order from `objective.order`; the authors' code runs the upper step first).
The maths lives in `bidvl.objectives`; this file only decides which net is trained in which phase.

Freezing: a net that is not trained in a phase is called through its *unwrapped* module with
detached parameters (`objectives.frozen_call`): gradients reach its input (e.g. the generator
through the energy net) but never its parameters, so there is no all-reduce for it and no stale
gradient in its `.grad`. Each optimizer steps right after its own backward (one GradScaler is
shared under fp16).

Determinism: the data stream is a pure function of (seed, rank, micro-batch index) and the noise
comes from torch's global RNG, which Accelerate checkpoints per process; a run resumed from step K
therefore continues exactly as the uninterrupted run (bit-exact on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import signal
import time
import warnings
import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    gather_object,
    set_seed,
)
from datetime import timedelta
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import objectives as obj
from .config import Config, ConfigError, load_config, to_dict, to_yaml
from .data import ShardError, read_meta, train_stream
from .evaluation.loading import CHECKPOINT_MARKER, complete_checkpoints
from .evaluation.sampling import restored_buffers
from .models import build_nets

@dataclass
class TrainState:
    """Counters saved as `train_state.json` in every checkpoint (JSON: nothing is unpickled)."""

    step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients (and fp16 overflow)
    skipped_in_a_row: int = 0  # consecutive training steps with a skipped optimizer step
    rollbacks: int = 0
    budget_used_s: float = 0.0  # training time counted against train.time_budget_min

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, type(getattr(self, f.name))(state[f.name]))


class EMA:
    """Exponential moving average of the generator (off by default, as the authors)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module):
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state):
        self.module.load_state_dict(state)


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config dict -> {dotted key: scalar or str} for TensorBoard hparams."""
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


class LatentNets(torch.nn.Module):
    """Encoder + generator as one module: the one model of the lower level's DeepSpeed engine."""

    def __init__(self, encoder: torch.nn.Module, generator: torch.nn.Module):
        super().__init__()
        self.encoder, self.generator = encoder, generator


def deepspeed_plugins(cfg: Config) -> dict | None:
    """Two DeepSpeed plugins (energy net; encoder + generator) when the accelerate launcher asks
    for DeepSpeed (ACCELERATE_USE_DEEPSPEED), else None.

    Supported: ZeRO stages 1 and 2, fp32 and bf16. Refused with a ConfigError: stage 0 (DeepSpeed
    refuses the direct engine.backward the engine needs), stage 3 (parameters are partitioned, so
    calling the frozen energy net through its detached parameters in the lower level does not
    work), fp16 (use bf16) and objective.latent_term=not_offset (its upper level steps the encoder
    alone, which a flat ZeRO optimizer over encoder + generator cannot do: it would move the
    generator by Adam momentum).
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    from accelerate.utils import DeepSpeedPlugin

    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    where = "the accelerate config's deepspeed_config"
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed zero_stage={stage} ({where}): expected 1 or 2 (see bidvl/engine.py)")
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 under DeepSpeed: use bf16 (or no)")
    if cfg.objective.name == "bidvl" and cfg.objective.latent_term == "not_offset":
        raise ConfigError("objective.latent_term=not_offset under DeepSpeed: its upper level steps the "
                          "encoder alone, which ZeRO's flat optimizer cannot do; use DDP")
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


class Trainer:
    def __init__(self, cfg: Config, with_data: bool = True):
        """with_data=False skips the shards (benchmarks and tests that feed `train_step` tensors
        themselves); `fit` then cannot be used."""
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        # From the start: a SLURM time-limit signal during start-up or resume must not be lost
        # (the per-node launcher starts us with SIGUSR1 ignored).
        self._stop_signal = 0
        self._previous_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGUSR1)
        }
        launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher_precision not in ("no", cfg.train.mixed_precision):
            warnings.warn(
                f"the accelerate launcher asks for mixed_precision={launcher_precision} but "
                f"train.mixed_precision={cfg.train.mixed_precision} is used: set "
                f"train.mixed_precision={launcher_precision} to train in it", stacklevel=2)
        plugins = deepspeed_plugins(cfg)
        self.deepspeed = plugins is not None
        self.bf16_weights = self.deepspeed and cfg.train.mixed_precision == "bf16"  # DeepSpeed's bf16
        on_cpu = not torch.cuda.is_available()  # DeepSpeed on the CPU (tests) needs gloo
        self.accelerator = Accelerator(
            deepspeed_plugins=plugins,
            mixed_precision=cfg.train.mixed_precision,
            dynamo_backend="inductor" if cfg.train.compile else "no",
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tensorboard")
            ),
            kwargs_handlers=[
                # Nets run twice before one backward (G on h_q and h_p): buffers must not be
                # re-broadcast in between.
                DistributedDataParallelKwargs(broadcast_buffers=False),
                InitProcessGroupKwargs(timeout=timedelta(minutes=30),
                                       backend="gloo" if on_cpu and self.deepspeed else None),
            ],
        )
        acc = self.accelerator
        self.meta = self._prepare_data() if with_data else None

        set_seed(cfg.run.seed)  # identical initial weights on every rank
        nets = build_nets(cfg.model, channels=cfg.data.channels, resolution=cfg.data.resolution)
        energy_net, encoder, generator = nets
        if cfg.model.sync_batchnorm and acc.num_processes > 1:
            if acc.device.type == "cpu":
                raise ConfigError("model.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm refuses "
                                  "CPU tensors (set model.sync_batchnorm=false on the CPU)")
            encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
            generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator)
        if cfg.train.channels_last:
            for net in (energy_net, encoder, generator):
                net.to(memory_format=torch.channels_last)
        eo, lo = cfg.train.energy_optim, cfg.train.latent_optim
        energy_opt = torch.optim.Adam(
            energy_net.parameters(), lr=eo.lr, betas=tuple(eo.betas), weight_decay=eo.weight_decay
        )
        latent_opt = torch.optim.Adam(
            list(encoder.parameters()) + list(generator.parameters()),
            lr=lo.lr, betas=tuple(lo.betas), weight_decay=lo.weight_decay,
        )
        if self.deepspeed:
            # One DeepSpeed engine per optimizer (Accelerate's multi-plugin API). The encoder and
            # generator are called as the engine's submodules: under ZeRO-1/2 their parameters are
            # whole on every rank and the engine's gradient hooks fire whoever calls them.
            acc.state.select_deepspeed_plugin("energy")
            self.energy_net, self.energy_opt = acc.prepare(energy_net, energy_opt)
            acc.state.select_deepspeed_plugin("latent")
            self.latent_engine, self.latent_opt = acc.prepare(LatentNets(encoder, generator), latent_opt)
            self.encoder, self.generator = encoder, generator
        else:
            self.latent_engine = None
            # Fixed order: checkpoint files model.safetensors, model_1, model_2, optimizer.bin, _1 follow it.
            (self.energy_net, self.encoder, self.generator, self.energy_opt, self.latent_opt) = acc.prepare(
                energy_net, encoder, generator, energy_opt, latent_opt
            )
        # The bare nets, unwrapped once: acc.unwrap_model parses package metadata on every call
        # (9 ms per call timed alone on the development CPU; docs/benchmarks.md).
        self.bare = {name: acc.unwrap_model(net) for name, net in
                     (("energy", self.energy_net), ("encoder", self.encoder), ("generator", self.generator))}
        if self.bf16_weights:
            # DeepSpeed casts parameters to bf16 but leaves buffers (BatchNorm statistics,
            # spectral-norm vectors) in fp32, which BatchNorm and spectral norm refuse.
            for net in self.bare.values():
                for module in net.modules():
                    for name, buf in module.named_buffers(recurse=False):
                        if buf.is_floating_point():
                            setattr(module, name, buf.to(torch.bfloat16))
        self.state = TrainState()
        self.lr_scale = 1.0  # lowered by a rollback after repeated non-finite steps
        self.ema = EMA(self.bare["generator"], cfg.train.ema) if cfg.train.ema > 0 else None

        micro_per_epoch = self._stream(0).batches_per_epoch if with_data else 1
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.train.grad_accum))
        # Different noise on every rank from here on (same weights were made above).
        set_seed(cfg.run.seed, device_specific=True)
        g = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_latent = torch.randn(cfg.log.num_images, cfg.model.latent_dim, generator=g)
        self.skipped_samples = 0  # bad data skipped by this rank's loader (data.on_error=skip)

    # ------------------------------------------------------------------ data

    def _prepare_data(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        folder = Path(cfg.data.train)
        if not (folder / "meta.json").is_file() and cfg.data.auto_build:
            if acc.is_main_process:
                from .data import build_shards

                acc.print(f"building {cfg.data.auto_build} shards in {folder} (first use)")
                build_shards(cfg.data.auto_build, out=str(folder), resolution=cfg.data.resolution)
            acc.wait_for_everyone()
        meta = read_meta(folder)
        for key, value in (("resolution", cfg.data.resolution), ("channels", cfg.data.channels)):
            if meta[key] != value:
                raise ConfigError(
                    f"data.{key}={value} but {folder / 'meta.json'} says {key}={meta[key]}"
                )
        if cfg.data.train_split not in meta["splits"]:
            raise ConfigError(
                f"data.train_split={cfg.data.train_split!r}: {folder / 'meta.json'} has splits "
                f"{', '.join(meta['splits'])}"
            )
        return meta

    def _stream(self, start_micro: int):
        cfg, acc = self.cfg, self.accelerator
        return train_stream(
            cfg.data.train, cfg.data.train_split, cfg.train.batch_size, seed=cfg.run.seed,
            rank=acc.process_index, world_size=acc.num_processes, num_workers=cfg.data.num_workers,
            start_batch=start_micro, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
        )

    # ------------------------------------------------------------------ phases

    def _frozen(self, name: str):
        """The bare net `name` called through its detached parameters (no gradient reaches them)."""
        return partial(obj.frozen_call, self.bare[name])

    def _no_sync(self, last: bool, *nets):
        stack = contextlib.ExitStack()
        if not last and not self.deepspeed:  # DeepSpeed: the accumulation boundary in _backward
            for net in nets:
                stack.enter_context(self.accelerator.no_sync(net))
        return stack

    def _outside_autocast(self):
        """Autocast for calls outside the training step (image grids, periodic evaluation), which
        pass fp32 tensors: under DeepSpeed bf16 the weights themselves are bf16."""
        if self.bf16_weights:
            return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16)
        return self.accelerator.autocast()

    def _backward(self, engine, loss: torch.Tensor, micro_batches: int, last: bool) -> None:
        """Backward of one micro-batch's loss. DeepSpeed: through the phase's own engine (not
        accelerator.backward, which knows one engine), which divides by gradient_accumulation_steps
        (= train.grad_accum) itself and reduces gradients at the accumulation boundary."""
        if self.deepspeed:
            engine.set_gradient_accumulation_boundary(is_boundary=last)
            engine.backward(loss)
        else:
            self.accelerator.backward(loss / micro_batches)

    def _optimizer_step(self, optimizer, params, name: str, metrics: dict, engine=None) -> None:
        """Clip (or just measure), skip non-finite gradients, step, zero.

        DeepSpeed: engine.step() clips (gradient_clipping = train.grad_clip), steps and zeroes; a
        non-finite gradient norm is seen only afterwards, so that step is not skipped, but it is
        counted like a skipped one and drives train.on_nonfinite (rollback by default)."""
        if self.deepspeed:
            engine.step()
            norm = engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if norm is None else float(norm))
            metrics[f"grad_norm/{name}"] = norm
            if not torch.isfinite(norm):
                self.state.skipped_steps += 1
                metrics["_nonfinite"] = True
            return
        acc, max_norm = self.accelerator, self.cfg.train.grad_clip
        if max_norm > 0 or acc.mixed_precision == "fp16":  # fp16: Accelerate unscales the gradients first
            norm = acc.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        else:  # only measured: no multiplication of every gradient by 1
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        metrics[f"grad_norm/{name}"] = norm.detach().float()
        if not torch.isfinite(norm) and acc.mixed_precision != "fp16":
            # Gradients are identical on every rank after the all-reduce, so every rank skips.
            self.state.skipped_steps += 1
            metrics["_nonfinite"] = True
        else:
            optimizer.step()
            if getattr(optimizer, "step_was_skipped", False):  # fp16 overflow: scaler skipped
                self.state.skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)

    def upper_level_step(self, batches, latents, metrics: dict) -> None:
        """Eq. (14): update the energy net (and, in `not_offset`, the encoder's KL to the prior)."""
        cfg, acc = self.cfg, self.accelerator
        o = cfg.objective
        generator = self.bare["generator"]
        not_offset = o.name == "bidvl" and o.latent_term == "not_offset"
        trained = [self.energy_net] + ([self.encoder] if not_offset else [])
        for i, (v, h_p) in enumerate(zip(batches, latents)):
            last = i == len(batches) - 1
            with self._no_sync(last, *trained), acc.autocast():
                with torch.no_grad():
                    v_hat = generator(h_p)
                energies = self.energy_net(torch.cat([v, v_hat.to(v.dtype)]))
                e_data, e_samples = energies[: len(v)], energies[len(v):]
                loss = obj.upper_level_loss(e_data, e_samples, o.upper_loss)
                if not_offset:
                    mu, logvar = self.encoder(v_hat)
                    loss = loss + o.w_latent * obj.upper_level_encoder_kl(mu, logvar)
                self._backward(self.energy_net, loss, len(batches), last)
            self._accumulate(metrics, loss_ul=loss, energy_data=e_data.mean(), energy_samples=e_samples.mean())
        self._optimizer_step(self.energy_opt, self.energy_net.parameters(), "energy_net", metrics,
                             engine=self.energy_net)
        if not_offset:
            self._optimizer_step(self.latent_opt, self.encoder.parameters(), "encoder_ul", metrics)

    def _lower_terms(self, v, h_p, energy_frozen, encoder_for_latent) -> obj.LowerLevelTerms:
        """The encoder + generator loss of objective.name (energy net frozen in all of them)."""
        o = self.cfg.objective
        if o.name == "vae":
            return obj.vae_loss(v, encoder=self.encoder, generator=self.generator)
        if o.name == "divergence_triangle":
            return obj.divergence_triangle_loss(v, h_p, energy_net=energy_frozen, encoder=self.encoder,
                                                generator=self.generator, w_latent=o.w_latent)
        energy_data = None
        if o.ratio_bias == "sigmoid":
            with torch.no_grad():
                energy_data = self.bare["energy"](v)
        return obj.lower_level_loss(
            v, h_p, energy_net=energy_frozen, encoder=self.encoder, generator=self.generator,
            encoder_for_latent=encoder_for_latent, latent_mode=o.latent_term,
            w_latent=o.w_latent, r_basic=o.r_basic, ratio_bias=o.ratio_bias, energy_data=energy_data,
        )

    def lower_level_step(self, batches, latents, metrics: dict) -> None:
        """Eq. (13) (or (11) in `not_offset`), or a baseline's encoder + generator loss: update
        encoder + generator, energy net frozen."""
        cfg, acc = self.cfg, self.accelerator
        o = cfg.objective
        energy_frozen = self._frozen("energy")
        encoder_for_latent = self.encoder if o.latent_term == "not_offset" else self._frozen("encoder")
        for i, (v, h_p) in enumerate(zip(batches, latents)):
            last = i == len(batches) - 1
            with self._no_sync(last, self.encoder, self.generator), acc.autocast():
                terms = self._lower_terms(v, h_p, energy_frozen, encoder_for_latent)
                self._backward(self.latent_engine, terms.loss, len(batches), last)
            self._accumulate(
                metrics, loss_ll=terms.loss, recon=terms.recon, kl=terms.kl,
                energy_term=terms.energy, latent_term=terms.latent, ratio=terms.ratio,
                weighted_vae=terms.weighted_vae,
            )
        params = list(self.encoder.parameters()) + list(self.generator.parameters())
        self._optimizer_step(self.latent_opt, params, "encoder_generator", metrics,
                             engine=self.latent_engine)
        if self.ema is not None:
            self.ema.update(self.bare["generator"])

    def set_learning_rates(self) -> None:
        """The authors' schedule, ExponentialLR stepped once per epoch, as a pure function of the
        step: lr = base_lr x lr_decay ** epoch (x lr_scale after a rollback)."""
        epoch = self.state.step // self.steps_per_epoch
        for opt, oc in ((self.energy_opt, self.cfg.train.energy_optim),
                        (self.latent_opt, self.cfg.train.latent_optim)):
            for group in opt.param_groups:
                group["lr"] = oc.lr * oc.lr_decay ** epoch * self.lr_scale

    @staticmethod
    def _accumulate(metrics: dict, **values):
        for k, v in values.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach().float()
            metrics[f"_n_{k}"] = metrics.get(f"_n_{k}", 0) + 1

    def check_nonfinite(self, metrics: dict) -> bool:
        """Counts consecutive steps with a non-finite skip; applies train.on_nonfinite after
        train.nonfinite_patience of them. Returns True when the run was rolled back."""
        cfg = self.cfg.train
        if not metrics.get("_nonfinite"):
            self.state.skipped_in_a_row = 0
            return False
        self.state.skipped_in_a_row += 1
        if self.state.skipped_in_a_row < cfg.nonfinite_patience or cfg.on_nonfinite == "skip":
            return False
        what = f"{self.state.skipped_in_a_row} consecutive steps with non-finite loss or gradients"
        if cfg.on_nonfinite == "stop":
            raise FloatingPointError(f"{what} at step {self.state.step} (train.on_nonfinite=stop)")
        if self.state.rollbacks >= cfg.max_rollbacks:
            raise FloatingPointError(f"{what} at step {self.state.step}, after {self.state.rollbacks} "
                                     f"rollbacks (train.max_rollbacks={cfg.max_rollbacks})")
        found = complete_checkpoints(self.run_dir)
        if not found:
            raise FloatingPointError(f"{what} at step {self.state.step} and no checkpoint to roll back to")
        rollbacks = self.state.rollbacks + 1
        self.load_checkpoint(found[-1])
        self.state.rollbacks = rollbacks
        self.lr_scale *= cfg.rollback_lr_scale
        self.set_learning_rates()
        self.accelerator.print(f"{what}: rolled back to {found[-1].name}, learning rates x{self.lr_scale:g}")
        return True

    def train_step(self, batches: list[torch.Tensor], latents: list[torch.Tensor] | None = None) -> dict:
        """One bi-level iteration on `grad_accum` micro-batches; returns this step's metrics.
        `latents` (the prior draws h_p, one per batch) are drawn here unless given (tests)."""
        cfg = self.cfg
        device = self.accelerator.device
        layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        batches = [b.to(device, non_blocking=True).contiguous(memory_format=layout) for b in batches]
        # h_p is drawn once per batch and reused by the upper step and the N lower steps.
        if latents is None:
            latents = [torch.randn(len(v), cfg.model.latent_dim, device=device) for v in batches]
        latents = [h.to(device) for h in latents]
        if self.bf16_weights:
            batches = [b.to(torch.bfloat16) for b in batches]
            latents = [h.to(torch.bfloat16) for h in latents]
        metrics: dict = {}
        for net in (self.energy_net, self.encoder, self.generator):
            net.train()
        upper = cfg.objective.name != "vae"  # the VAE has no energy net to train
        if upper and cfg.objective.order == "upper_first":
            self.upper_level_step(batches, latents, metrics)
        for _ in range(cfg.objective.lower_steps):
            self.lower_level_step(batches, latents, metrics)
        if upper and cfg.objective.order == "lower_first":
            self.upper_level_step(batches, latents, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Accelerate state + our JSON/safetensors into a temp folder, fsync, a COMPLETE marker, then
        one rename: only complete checkpoints exist under their final name. Keeps the newest
        `checkpoint.keep` complete ones (never fewer than one)."""
        acc = self.accelerator
        name = f"step_{self.state.step:08d}"
        final, tmp = self.checkpoint_dir / name, self.checkpoint_dir / f".tmp_{name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        digests = gather_object([self.replica_digest()])
        acc.wait_for_everyone()
        if acc.is_main_process:
            if len(set(digests)) != 1:
                bad = [r for r, d in enumerate(digests) if d != digests[0]]
                raise RuntimeError(f"replicas diverged at step {self.state.step}: ranks {bad} differ from rank 0")
            (tmp / "replicas.json").write_text(json.dumps({"sha256": digests}) + "\n")
            (tmp / "train_state.json").write_text(
                json.dumps({**self.state.state_dict(), "lr_scale": self.lr_scale}) + "\n")
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            if self.ema is not None:
                save_file(self.ema.state_dict(), str(tmp / "generator_ema.safetensors"))
            for path in tmp.rglob("*"):  # DeepSpeed writes one folder per engine
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            with open(tmp / CHECKPOINT_MARKER, "w") as f:
                f.write(f"{self.state.step}\n")
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep]:
                (old / CHECKPOINT_MARKER).unlink()  # first: a half-deleted folder is never "complete"
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def replica_digest(self) -> str:
        """sha256 of every parameter of the three nets: equal on all ranks, or DDP broke.

        Buffers are left out on purpose: with broadcast_buffers=False each rank keeps BatchNorm
        running statistics of its own batches (rank 0's are saved), unless model.sync_batchnorm.
        """
        h = hashlib.sha256()
        for net in self.bare.values():
            for name, t in net.named_parameters():
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def find_resume_checkpoint(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.run_dir)
            return found[-1] if found else None
        path = Path(resume)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise ConfigError(
                f"checkpoint.resume={resume}: not a complete checkpoint folder (no {CHECKPOINT_MARKER} marker)"
            )
        return path

    def check_compatible(self, path: Path) -> None:
        """A checkpoint of another architecture fails here, naming the key and both values."""
        saved = load_config(path / "config.yaml")
        for section, keys in (("model", [f.name for f in dataclasses.fields(saved.model)]),
                              ("data", ["resolution", "channels"])):
            for key in keys:
                ours, theirs = getattr(getattr(self.cfg, section), key), getattr(getattr(saved, section), key)
                if ours != theirs:
                    raise ConfigError(
                        f"checkpoint {path} was trained with {section}.{key}={theirs!r}, "
                        f"this config has {section}.{key}={ours!r}"
                    )

    def load_checkpoint(self, path: Path) -> None:
        self.check_compatible(path)
        self.accelerator.load_state(str(path))  # safetensors + weights_only torch.load
        state = json.loads((path / "train_state.json").read_text())
        self.lr_scale = float(state.pop("lr_scale", 1.0))
        self.state.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(load_file(str(path / "generator_ema.safetensors")))
        self.set_learning_rates()

    def resume(self) -> None:
        path = self.find_resume_checkpoint()
        if path is not None:
            self.load_checkpoint(path)
            self.accelerator.print(f"resumed from {path} at step {self.state.step}")

    def export(self) -> Path:
        """The three nets as safetensors + resolved config, written atomically by the main process."""
        acc = self.accelerator
        out, tmp = self.run_dir / "model", self.run_dir / ".tmp_model"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, net in self.bare.items():
                state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"), metadata={"step": str(self.state.step)})
            if self.ema is not None:
                state = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
                save_file(state, str(tmp / "generator_ema.safetensors"))
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        acc.wait_for_everyone()
        return out

    # ------------------------------------------------------------------ logging

    def _log(self, window: list[dict], elapsed: float, images: int, skipped_samples: int = 0,
             data_wait: float = 0.0) -> dict:
        """Means over the window's steps, averaged over ranks; `elapsed` (s) is the window's wall
        time, `data_wait` (s) the part of it this rank spent blocked on the data stream."""
        acc = self.accelerator
        keys = sorted(k for k in window[0] if not k.startswith("_"))
        sums = {}
        for k in keys:
            total = sum(m[k] for m in window if k in m)
            count = sum(m.get(f"_n_{k}", 1) for m in window if k in m)
            sums[k] = total / count
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=acc.device) for k in keys])
        stacked = acc.reduce(stacked, reduction="mean")
        logs = {f"loss/{k}" if not k.startswith("grad_norm") else k: v.item() for k, v in zip(keys, stacked)}
        if "loss/energy_data" in logs:  # not for the VAE, which has no upper level
            logs["energy/data"] = logs.pop("loss/energy_data")
            logs["energy/samples"] = logs.pop("loss/energy_samples")
            logs["energy/gap"] = logs["energy/samples"] - logs["energy/data"]
        logs["lr/energy_net"] = self.energy_opt.param_groups[0]["lr"]
        logs["lr/encoder_generator"] = self.latent_opt.param_groups[0]["lr"]
        logs["perf/images_per_sec"] = images / max(elapsed, 1e-9)
        logs["perf/step_ms"] = 1e3 * elapsed / len(window)
        logs["perf/data_wait_fraction"] = data_wait / max(elapsed, 1e-9)  # main process's
        logs["train/skipped_steps"] = self.state.skipped_steps
        logs["train/skipped_samples"] = skipped_samples
        logs["train/rollbacks"] = self.state.rollbacks
        logs["train/epoch"] = self.state.step / self.steps_per_epoch
        acc.log(logs, step=self.state.step)
        return logs

    @torch.no_grad()
    def _log_images(self, v: torch.Tensor) -> None:
        acc = self.accelerator
        if not acc.is_main_process:
            return
        from torchvision.utils import make_grid

        generator = self.ema.module if self.ema is not None else self.bare["generator"]
        encoder = self.bare["encoder"]
        # Train-mode BatchNorm, as the authors sample, without changing any statistic: logging must
        # not change training.
        with restored_buffers(generator), restored_buffers(encoder), self._outside_autocast():
            samples = generator(self.fixed_latent.to(acc.device)).float()
            real = v[: min(32, len(v))]
            recon = generator(encoder(real)[0]).float()
        pairs = torch.stack([real.float(), recon], 1).flatten(0, 1)
        writer = acc.get_tracker("tensorboard", unwrap=True)
        nrow = int(math.sqrt(len(samples)))
        writer.add_image("samples", make_grid(samples, nrow=nrow, normalize=True, value_range=(-1, 1)), self.state.step)
        writer.add_image("reconstructions", make_grid(pairs, nrow=8, normalize=True, value_range=(-1, 1)), self.state.step)

    # ------------------------------------------------------------------ loop

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if self.meta is None:
            raise RuntimeError("Trainer(cfg, with_data=False) cannot fit(): it has no data stream")
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            for partial in self.checkpoint_dir.glob(".tmp_step_*"):  # left by a killed run
                shutil.rmtree(partial, ignore_errors=True)
        acc.init_trackers("bidvl", config=flatten(to_dict(cfg)))
        self.resume()
        self.set_learning_rates()

        accum = cfg.train.grad_accum
        start = self.state.step
        stream = iter(self._stream(start * accum))
        progress = tqdm(total=cfg.train.max_steps, initial=start, disable=not acc.is_main_process,
                        desc="train", dynamic_ncols=True)
        window, t0, images, logs, last_saved = [], time.perf_counter(), 0, {}, (start if start else -1)
        data_wait = 0.0  # seconds blocked in next(stream) since the last log
        clock = time.process_time if cfg.train.budget_clock == "process" else time.perf_counter
        budget_s = cfg.train.time_budget_min * 60.0
        def spent() -> bool:
            return budget_s > 0 and self.state.budget_used_s >= budget_s

        over_budget = spent()  # True when resumed after the end of the budget
        while self.state.step < cfg.train.max_steps and not over_budget:
            tick = clock()
            batches = []
            waiting = time.perf_counter()
            for _ in range(accum):
                batch, _, skipped = next(stream)
                batches.append(batch)
                self.skipped_samples += skipped
            data_wait += time.perf_counter() - waiting
            metrics = self.train_step(batches)
            self.state.step += 1
            self.state.budget_used_s += clock() - tick
            images += sum(len(b) for b in batches) * acc.num_processes
            window.append(metrics)
            stop_signal, skipped_samples, over_budget = self._synchronised_flags(spent())
            if skipped_samples > cfg.data.max_skipped:
                raise ShardError(f"{skipped_samples} bad samples or shards skipped, more than "
                                 f"data.max_skipped={cfg.data.max_skipped} (see the warnings above)")
            if self.check_nonfinite(metrics):  # rolled back: reopen the data where that step was
                stream = iter(self._stream(self.state.step * accum))
                progress.n = self.state.step
                window, data_wait = [], 0.0
                continue
            step = self.state.step
            if step % self.steps_per_epoch == 0:  # epoch boundary: decay both LRs
                self.set_learning_rates()
            last = step == cfg.train.max_steps or over_budget
            if window and (step % cfg.log.every == 0 or last):
                logs = self._log(window, time.perf_counter() - t0, images, skipped_samples, data_wait)
                progress.set_postfix(gap=f"{logs.get('energy/gap', float('nan')):.3f}", recon=f"{logs.get('loss/recon', 0):.1f}")
                window, t0, images, data_wait = [], time.perf_counter(), 0, 0.0
            if step % cfg.log.images_every == 0 or last:
                self._log_images(batches[0].to(acc.device))
            if cfg.eval.every and step % cfg.eval.every == 0:
                from .evaluation.periodic import evaluate_during_training

                with self._outside_autocast():
                    figures = evaluate_during_training(acc, cfg, self.energy_net, self.encoder, self.generator, step)
                if figures:
                    acc.log(figures, step=step)
            if step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                last_saved = step
            progress.update(1)
            if stop_signal:
                acc.print(f"signal {stop_signal}: checkpointing at step {step} and exiting")
                if last_saved != step:
                    self.save_checkpoint()
                break
        else:  # max_steps reached or time budget used up (a signal breaks out above)
            if over_budget:
                acc.print(f"time budget of {cfg.train.time_budget_min:g} min ({cfg.train.budget_clock} "
                          f"clock) used at step {self.state.step}: exporting and stopping")
            if last_saved != self.state.step:
                self.save_checkpoint()
            self.export()
        progress.close()
        self.close()
        return logs

    def _synchronised_flags(self, over_budget: bool = False) -> tuple[int, int, bool]:
        """(a stop signal received by any rank, bad data skipped on all ranks, any rank over its
        time budget): one small all-reduce per step, so every rank takes the same decision at the
        same step. One process: no device tensor, so no wait for the device's queue."""
        flags = [float(self._stop_signal), float(self.skipped_samples), float(over_budget)]
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device),
                                            reduction="sum").tolist()  # one device sync, not three
        return int(flags[0]), int(flags[1]), flags[2] > 0

    def close(self) -> None:
        """Free nets and optimizers and synchronise before ending (avoids aborts at exit)."""
        acc = self.accelerator
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        acc.wait_for_everyone()
        if self.deepspeed:  # both engines, while the process group still exists
            for engine in (self.energy_net, self.latent_engine):
                engine.destroy()
            acc.deepspeed_engine_wrapped = None
            self.latent_engine = None
        acc.end_training()
        acc.free_memory()
        self.energy_net = self.encoder = self.generator = self.bare = None
        self.energy_opt = self.latent_opt = None
