"""The bi-level training engine: which net is trained in which phase, and the loop around it.

One `Trainer` owns the three nets (prepared by Accelerate in the fixed order energy_net, encoder,
generator, energy optimizer, latent optimizer) and runs, per batch, one upper-level step and N
lower-level steps (order from `objective.order`; the authors' code runs the upper step first).
The work is done by components, each in its own module:

    bidvl.objectives    the losses, as an object built from cfg.objective (which nets each level trains)
    bidvl.checkpoint    save / find / load checkpoints, export, replica digests (names: bidvl.run_dir)
    bidvl.tracking      step metrics, the logging window, timers, image grids
    bidvl.distributed   the Accelerator, DeepSpeed's two engines, the per-step flags all ranks share
    bidvl.data          the training stream (`ShardStream`, or any object with its two members)
    bidvl.health        run health checks, verdicts, RUN_DIR/health.jsonl, and health.on_unhealthy
    bidvl.stopping      stop signals, and the wait for data a stop may interrupt

`fit` reads top to bottom: fetch -> step -> flags (agreed on the host) -> at sync steps: non-finite
policy -> log -> evaluate -> health -> checkpoint. An ordinary step reads nothing back from the
device (tests/test_device_reads.py); device values are read only at sync steps (`_sync_step`).

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
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from . import objectives
from .ceilings import build_nets_within_memory
from .checkpoint import Checkpointer, TrainState
from .config import Config, resolve
from .data import ShardError, ShardStream
from .distributed import (HostFlags, cast_buffers_to_bf16, deepspeed_plugins, end_with_the_launcher,
                          make_accelerator, prepare_nets, step_optimizer)
from .evaluation.periodic import PeriodicEvaluation
from .health import HealthMonitor
from .model_card import model_card_writer
from .models.ema import EMA
from .nonfinite import NonfiniteCounts, apply_policy
from .stopping import StopControl
from .tracking import (MetricsWindow, Progress, StepResult, close_run, counting_flops, log_image_grids, log_metrics,
                      peak_tflops, start_trackers, tracker_writes)

NETS = ("energy", "encoder", "generator")  # the prepare order; checkpoint file names follow it


def train(cfg: Config, lock=None) -> int:
    """Trains `cfg` to its end (max_steps, time budget or a stop signal). Returns the stop signal
    this process received (0: none). What launch/train.py and the study's training stage run.
    `lock`: the run folder's FolderLock (bidvl.run_dir) when the caller took it already."""
    trainer = Trainer(cfg, lock)
    finished = False
    try:
        trainer.fit()
        finished = True
    finally:
        trainer.close(synchronise=finished)  # after an error other ranks may be inside a collective
    return trainer.stops.signal


class Trainer:
    def __init__(self, cfg: Config, lock=None):
        """`cfg` is resolved once here (bidvl.config.resolve: every `auto` replaced, so config.yaml
        and checkpoints say what ran); the caller's object is left as it was. `lock`: the run
        folder's FolderLock if the caller took it already (`bidvl train` does, before importing this)."""
        typed, self.cfg = cfg, resolve(cfg)
        cfg = self.cfg
        self.stops = StopControl(cfg.train.stop_wait_s)  # from the start (bidvl.stopping)
        try:
            self._build(cfg, typed, lock)
        except BaseException:  # a trainer that failed to build leaves the signal handlers as they were
            self.stops.restore()
            raise

    def _build(self, cfg: Config, typed: Config, lock) -> None:
        """Processes, nets, optimizers, checkpointer, EMA and the fixed latents (for __init__)."""
        end_with_the_launcher()
        plugins = deepspeed_plugins(cfg)
        self.deepspeed = plugins is not None
        self.bf16_weights = self.deepspeed and cfg.train.mixed_precision == "bf16"  # DeepSpeed's bf16
        self.accelerator = acc = make_accelerator(cfg, plugins)
        self.stops.processes = acc.num_processes
        self.flags = HostFlags(acc)  # the per-step flags all ranks agree on, on the host
        self.objective = objectives.build(cfg)

        set_seed(cfg.run.seed)  # identical initial weights on every rank
        nets = build_nets_within_memory(cfg, acc.device, self.deepspeed)  # (bidvl.ceilings)
        nets = prepare_nets(acc, cfg, nets, self.deepspeed)
        self.energy_net, self.encoder, self.generator = nets.energy_net, nets.encoder, nets.generator
        self.energy_opt, self.latent_opt = nets.energy_opt, nets.latent_opt
        self.latent_engine = nets.latent_engine  # DeepSpeed's engine for encoder + generator, else None
        # Unwrapped once: acc.unwrap_model parses package metadata on every call.
        self.unwrapped = {name: acc.unwrap_model(net) for name, net in
                          zip(NETS, (self.energy_net, self.encoder, self.generator))}
        if self.bf16_weights:
            cast_buffers_to_bf16(self.unwrapped.values())
        self.frozen = {name: objectives.Frozen(net) for name, net in self.unwrapped.items()}
        self._levels = {}  # level -> its terms function (level_terms)
        self.state = TrainState()
        self.nonfinite = NonfiniteCounts(acc.device, cfg.train.nonfinite_patience)  # read at sync steps
        self.checkpointer = Checkpointer(acc, cfg, typed, lock)
        self.ema = EMA(self.unwrapped["generator"], cfg.train.ema, cfg.train.ema_warmup) if cfg.train.ema > 0 else None
        self.steps_per_epoch = 1  # set from the data stream by fit()
        # Different noise on every rank from here on (same weights were made above).
        set_seed(cfg.run.seed, device_specific=True)
        g = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_latent = torch.randn(cfg.log.num_images, cfg.model.latent_dim, generator=g)
        self.skipped_samples = 0  # bad data skipped by this rank's loader (data.on_error=skip)
        self.health = None  # HealthMonitor, built by fit() once the data exists (health.every > 0)

    # ------------------------------------------------------------------ phases

    def _frozen(self, name: str):
        """The unwrapped net `name` called through its detached parameters (no gradient reaches
        them); one object per net, so a compiled level sees the same module at every call."""
        return self.frozen[name]

    def level_terms(self, level):
        """The function (v, h_p) -> terms of `level`: "upper", or a lower-level phase (a tuple of
        net names, objective.lower_level_phases). Eager, or under train.compile one torch.compile'd
        graph per level (fullgraph: a graph break is an error, never a silent fallback; static
        shapes; train.compile_backend), whose backward AOTAutograd compiles too. Nets, autocast and
        DDP's no_sync stay outside, as in the eager step."""
        fn = self._levels.get(level)
        if fn is None:
            if level == "upper":
                def fn(v, h_p):
                    with torch.no_grad():
                        v_hat = self.unwrapped["generator"](h_p)
                    return self.objective.upper_level(v, v_hat, energy_net=self.energy_net, encoder=self.encoder)
            else:
                nets = {"encoder": self.encoder, "generator": self.generator}
                called = {name: net if name in level else self._frozen(name) for name, net in nets.items()}
                frozen = {"energy_net": self._frozen("energy"), "frozen_encoder": self._frozen("encoder")}

                def fn(v, h_p):
                    return self.objective.lower_level(v, h_p, phase=level, **called, **frozen)
            if self.cfg.train.compile:
                fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.cfg.train.compile_backend)
            self._levels[level] = fn
        return fn

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
        """DeepSpeed: through the phase's own engine (accelerator.backward knows one engine), which
        divides by gradient_accumulation_steps itself and reduces at the accumulation boundary."""
        if self.deepspeed:
            engine.set_gradient_accumulation_boundary(is_boundary=last)
            engine.backward(loss)
        else:
            self.accelerator.backward(loss / micro_batches)

    def _optimizer_step(self, optimizer, params, name: str, result: StepResult, engine=None) -> None:
        norm, skipped, nonfinite = step_optimizer(self.accelerator, optimizer, params, self.cfg.train.grad_clip,
                                                  engine if self.deepspeed else None)
        result.set(f"grad_norm/{name}", norm)
        result.add_optimizer_step(skipped, nonfinite)

    def upper_level_step(self, batches, latents, result: StepResult) -> None:
        """Eq. (14): update the nets the objective trains in the upper level (the energy net)."""
        trains_encoder = "encoder" in self.objective.upper_level_trains
        trained = [self.energy_net] + ([self.encoder] if trains_encoder else [])
        terms_of = self.level_terms("upper")
        for i, (v, h_p) in enumerate(zip(batches, latents)):
            last = i == len(batches) - 1
            with self._no_sync(last, *trained), self.accelerator.autocast():
                terms = terms_of(v, h_p)
                self._backward(self.energy_net, terms.loss, len(batches), last)
            result.add({"loss/loss_ul": terms.loss, "energy/data": terms.energy_data.mean(),
                        "energy/samples": terms.energy_samples.mean()})
            if terms.energy_noise is not None:  # objective.noise_negatives
                result.add({"energy/noise": terms.energy_noise.mean()})
        self._optimizer_step(self.energy_opt, self.energy_net.parameters(), "energy_net", result,
                             engine=self.energy_net)
        if trains_encoder:
            self._optimizer_step(self.latent_opt, self.encoder.parameters(), "encoder_ul", result)

    def lower_level_step(self, batches, latents, result: StepResult) -> None:
        """Eq. (13) (or (11) in `not_offset`), or a baseline's loss: update encoder + generator,
        energy net frozen; one backward and step per phase of the objective (BiDVL and the VAE:
        one, both nets; the Divergence triangle: the encoder, then the generator)."""
        phases = self.objective.lower_level_phases
        for phase in phases:
            self._lower_level_phase(phase, batches, latents, result, loss_name="loss_ll" if len(phases) == 1
                                    else "loss_" + "_".join(phase))
        if self.ema is not None:
            self.ema.update(self.unwrapped["generator"], self.state.ema_updates)
            self.state.ema_updates += 1

    def _lower_level_phase(self, phase, batches, latents, result: StepResult, loss_name: str) -> None:
        """Trains the nets named in `phase` (the other lower-level net frozen)."""
        nets = {"encoder": self.encoder, "generator": self.generator}
        trained = [nets[name] for name in phase]
        terms_of = self.level_terms(tuple(phase))
        for i, (v, h_p) in enumerate(zip(batches, latents)):
            last = i == len(batches) - 1
            with self._no_sync(last, *trained), self.accelerator.autocast():
                terms = terms_of(v, h_p)
                self._backward(self.latent_engine, terms.loss, len(batches), last)
            result.add({f"loss/{k}": v for k, v in (
                (loss_name, terms.loss), ("recon", terms.recon), ("kl", terms.kl), ("energy_term", terms.energy),
                ("latent_term", terms.latent), ("ratio", terms.ratio), ("weighted_vae", terms.weighted_vae))
                if v is not None})
        params = [p for net in trained for p in net.parameters()]
        self._optimizer_step(self.latent_opt, params, "_".join(phase), result, engine=self.latent_engine)

    def train_step(self, batches: list[torch.Tensor], latents: list[torch.Tensor] | None = None) -> StepResult:
        """One bi-level iteration on `grad_accum` micro-batches. `latents` (the prior draws h_p,
        one per batch) are drawn here unless given (tests)."""
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
        result = StepResult()
        for net in (self.energy_net, self.encoder, self.generator):
            net.train()
        upper = self.objective.has_upper_level
        if upper and cfg.objective.order == "upper_first":
            self.upper_level_step(batches, latents, result)
        for _ in range(cfg.objective.lower_steps):
            self.lower_level_step(batches, latents, result)
        if upper and cfg.objective.order == "lower_first":
            self.upper_level_step(batches, latents, result)
        self.nonfinite.record(result.skipped, result.nonfinite, self.state.step + 1)  # on the device
        return result

    # ------------------------------------------------------------------ schedule and policies

    def set_learning_rates(self) -> None:
        """The authors' schedule, ExponentialLR stepped once per epoch, as a pure function of the
        step: lr = base_lr x lr_decay ** epoch (x lr_scale after a rollback)."""
        epoch = self.state.step // self.steps_per_epoch
        for opt, oc in ((self.energy_opt, self.cfg.train.energy_optim),
                        (self.latent_opt, self.cfg.train.latent_optim)):
            for group in opt.param_groups:
                group["lr"] = oc.lr * oc.lr_decay ** epoch * self.state.lr_scale

    def apply_nonfinite_policy(self) -> bool:
        """At a sync step: the non-finite counts read, then train.on_nonfinite
        (bidvl.nonfinite.apply_policy). True: rolled back."""
        return apply_policy(self)

    def check_health(self, step: int, logs: dict) -> bool:
        """A health check, then health.on_unhealthy (bidvl.health.HealthMonitor.act). Returns True
        when the run was restarted."""
        return self.health.act(self, step, logs)

    # ------------------------------------------------------------------ checkpoints (bidvl.checkpoint)

    def save_checkpoint(self) -> Path:
        self.nonfinite.read_into(self.state)  # the counts in the saved state are current
        return self.checkpointer.save(self.state, self.unwrapped, self.ema)

    def export(self) -> Path:
        """RUN_DIR/model: the nets, the config and the model card (bidvl.model_card)."""
        generator = self.ema.module if self.ema is not None else self.unwrapped["generator"]
        card = model_card_writer(self.accelerator, self.cfg, self.state, generator, self._outside_autocast(),
                                 ema=self.ema is not None, health=self.health.last if self.health is not None else None)
        return self.checkpointer.export(self.state.step, self.unwrapped, self.ema, extra=card)

    # ------------------------------------------------------------------ the loop

    def _log_images(self, v: torch.Tensor) -> None:
        if self.accelerator.is_main_process:
            generator = self.ema.module if self.ema is not None else self.unwrapped["generator"]
            log_image_grids(self.accelerator, self.state.step, generator, self.unwrapped["encoder"],
                            self.fixed_latent, v, self._outside_autocast())

    def fit(self, stream=None) -> dict:
        """Trains to train.max_steps (or the time budget, or a stop signal); returns the last logs.
        `stream`: the data (see bidvl.data.stream; default: `ShardStream` over data.train)."""
        cfg, acc = self.cfg, self.accelerator
        stream = stream if stream is not None else ShardStream(cfg, acc)
        accum = cfg.train.grad_accum
        self.steps_per_epoch = max(1, math.ceil(stream.batches_per_epoch / accum))
        self.checkpointer.begin()
        loaded = self.checkpointer.resume(self.unwrapped, self.ema)
        if loaded is not None:
            resumed_from, self.state = loaded
            self.nonfinite.start_from(self.state)
            acc.print(f"resumed from {resumed_from} at step {self.state.step}")
        self.checkpointer.write_config()
        self.health = HealthMonitor.for_run(acc, cfg, self.objective, self.state.health_lines)
        start_trackers(acc, cfg)
        self.set_learning_rates()

        start = self.state.step
        batches_iter = stream.open(start * accum)
        progress = Progress(acc, cfg, start)
        how, model = "", None  # how the training ended, where its export went (the closing lines)
        window, logs, last_saved = MetricsWindow(acc, 0, peak_tflops(cfg, acc)), {}, (start if start else -1)
        # The first step's FLOPs are counted (perf/tflops, perf/mfu); not under train.compile, whose
        # graphs the counter would have to trace again.
        count_flops = not cfg.train.compile
        periodic, eval_figures = PeriodicEvaluation(acc, cfg), {}  # the last evaluation during training (eval.every)
        clock = time.process_time if cfg.train.budget_clock == "process" else time.perf_counter
        budget_s = cfg.train.time_budget_min * 60.0

        def spent() -> bool:
            return budget_s > 0 and self.state.budget_used_s >= budget_s

        over_budget = spent()  # True when resumed after the end of the budget
        while self.state.step < cfg.train.max_steps and not over_budget:
            tick = clock()
            with window.waiting_for_data():
                arrived = self.stops.next_batches(batches_iter, accum)
            if arrived is None:
                how = self.stops.stopped_while_waiting(acc, self.state.step, last_saved, self._settle_and_save)
                break
            batches, skipped = arrived
            self.skipped_samples += skipped
            if count_flops:
                result, window.step_flops = counting_flops(lambda: self.train_step(batches))
                count_flops = False
            else:
                result = self.train_step(batches)
            self.state.step += 1
            self.state.budget_used_s += clock() - tick
            window.record(result, images=sum(len(b) for b in batches) * acc.num_processes)
            flags = self.flags.agree(bool(self.stops.signal), self.skipped_samples, spent())
            over_budget = flags.over_budget
            if flags.skipped_samples > cfg.data.max_skipped:
                raise ShardError(f"{flags.skipped_samples} bad samples or shards skipped, more than "
                                 f"data.max_skipped={cfg.data.max_skipped} (see the warnings above)")
            step = self.state.step
            last = step == cfg.train.max_steps or over_budget
            # Device values are read only at sync steps (the counts, the logs); the steps between
            # read nothing, so a GPU never waits for the host there (bidvl.nonfinite).
            if (last or flags.stop or self._sync_step(step)) and self.apply_nonfinite_policy():
                batches_iter = stream.open(self.state.step * accum)  # rolled back: reopen the data there
                progress.moved_to(self.state.step)
                window.drop_steps()
                continue
            if step % self.steps_per_epoch == 0:  # epoch boundary: decay both LRs
                self.set_learning_rates()
            if window.steps and (step % cfg.log.every == 0 or last):
                logs = window.flush(step, self._scalars(flags.skipped_samples))
                verdict = self.health.verdict if self.health is not None else ""
                progress.logged(step, logs, verdict, self.state.budget_used_s)
            if step % cfg.log.images_every == 0 or last:
                self._log_images(batches[0].to(acc.device))
            if cfg.eval.every and step % cfg.eval.every == 0:

                with self._outside_autocast():
                    figures = periodic(self.energy_net, self.encoder, self.generator, step)
                if figures:
                    log_metrics(acc, figures, step)
                    eval_figures = figures
            if self.health is not None and step % cfg.health.every == 0:
                with self._outside_autocast():
                    restarted = self.check_health(step, logs)
                if restarted:  # reopen the data where the restart point was
                    self.nonfinite.start_from(self.state)
                    batches_iter = stream.open(self.state.step * accum)
                    progress.moved_to(self.state.step)
                    window.drop_steps()
                    last_saved = self.state.step
                    continue
            if step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                last_saved = step
            progress.update()
            if flags.stop:
                why = f"signal {self.stops.signal}" if self.stops.signal else "a stop signal on another rank"
                acc.print(f"{why}: checkpointing at step {step} and exiting")
                if last_saved != step:
                    self.save_checkpoint()
                how = f"stopped by {why}"
                break
        else:  # max_steps reached or time budget used up (a signal breaks out above)
            if over_budget:
                acc.print(f"time budget of {cfg.train.time_budget_min:g} min ({cfg.train.budget_clock} "
                          f"clock) used at step {self.state.step}: exporting and stopping")
            if last_saved != self.state.step:
                self.save_checkpoint()
            model = self.export()
            how = "stopped by its time budget" if over_budget else "finished"
        close_run(acc, cfg, progress, how, self.state.step, logs, eval_figures, model, self.health)
        self.stops.ended = how
        return logs

    def _sync_step(self, step: int) -> bool:
        """A step at which the loop reads device values anyway (log, images, evaluation, health,
        checkpoint): the non-finite counts are read there too."""
        cfg = self.cfg
        every = [cfg.log.every, cfg.log.images_every, cfg.checkpoint.every, cfg.eval.every,
                 cfg.health.every if self.health is not None else 0]
        return any(n and step % n == 0 for n in every)

    def _settle_and_save(self) -> None:
        """A checkpoint outside the loop's order (a stop while waiting for data): the non-finite
        policy first, as at any sync step; a rollback leaves nothing to save."""
        if not self.apply_nonfinite_policy():
            self.save_checkpoint()

    def _scalars(self, skipped_samples: int) -> dict:
        return {
            "lr/energy_net": self.energy_opt.param_groups[0]["lr"],
            "lr/encoder_generator": self.latent_opt.param_groups[0]["lr"],
            "train/skipped_steps": self.state.skipped_steps,
            "train/skipped_samples": skipped_samples,
            "train/rollbacks": self.state.rollbacks,
            "train/epoch": self.state.step / self.steps_per_epoch,
        }

    def close(self, synchronise: bool = True) -> None:
        """Restore signal handlers, free nets and optimizers, end the trackers. `synchronise`
        waits for every rank first (avoids aborts at exit); pass False after an error, when other
        ranks may be inside a collective that will never complete. Safe to call twice."""
        if self.energy_net is None:
            return
        acc = self.accelerator
        if synchronise:
            acc.wait_for_everyone()
        if self.deepspeed:  # both engines, while the process group still exists
            for engine in (self.energy_net, self.latent_engine):
                engine.destroy()
            acc.deepspeed_engine_wrapped = None
            self.latent_engine = None
        self.checkpointer.end()  # the run folder's lock
        refused = None
        try:
            with tracker_writes(acc, self.state.step):
                acc.end_training()  # the trackers' last writes
        except OSError as exc:  # after an error, that error says why; a finished run reports this one
            refused = exc
        acc.free_memory()
        self.energy_net = self.encoder = self.generator = self.unwrapped = None
        self.energy_opt = self.latent_opt = None
        self.stops.restore()  # last: a stop signal during the teardown above is reported, not fatal
        if refused is not None and synchronise:
            raise refused
