"""Run health: whether a run is learning, said while it runs. The one module that knows it.

    monitor = HealthMonitor(accelerator, cfg, objective)        # the fixed probe is built here
    monitor.resume(state.health_lines)                          # after a resume: its history back
    record = monitor.check(step, nets, logs)                    # every health.every steps, all ranks
    record["verdict"], record["reasons"]                        # healthy | warning | unhealthy

EBM training is unstable: one config gives a good model on one seed and a collapsed one on the
next, while the losses look ordinary (docs/study_fashion_mnist_scaling.md; docs/health.md). The
two failure modes seen in the study setting, and what each check looks for:

- **Texture collapse**: the generator settles in a texture or a few modes. Seen as samples whose
  pixel spread across the batch (`spread`: mean per-pixel std of the samples / of the data) or
  nearest-neighbour distance (`nn_ratio`) is far below the data's, or whose high-frequency energy
  (`hf_ratio`: mean squared difference from a 3x3 blur, samples / data) is far above it.
  With a feature extractor (eval.features, eval.inception_weights): precision, recall, density
  and coverage (Kynkaenniemi et al. 2019; Naeem et al. 2020, k = 5) and a small-n FID-style score.
- **Noise preferred**: the energy ranks noise above data. AUROC of -E(v) on the held-out batch
  against four kinds of noise: `uniform` (U[-1, 1], full frame), `shaped` (uniform noise with the
  data's per-pixel mean and std: its support, borders and mean), `constant` (one value per image)
  and `blurred` (the held-out batch, Gaussian blur with sigma = resolution / 8). A VAE is scored
  by its negative ELBO, as in the evaluation (`Objective.ood_scorer`).
- **Energy gone flat**: the energy net's output no longer varies (`energy_spread`: the std of E
  over the probe images and the samples; a softplus energy stuck at its floor of 0 gives ~1e-14),
  so the generator gets no signal from it. Seen in the study's seed 0, whose samples then stop
  improving (FID-style 24 against the VAE's 14).
- Besides: the energy gap E(samples) - E(data), the held-out reconstruction RMSE and its trend,
  the last logging window's gradient norms and losses, and anything non-finite.

A check runs on the main process on a fixed probe: the first `health.num_images` held-out images,
latents and noise from fixed seeds (no global RNG is read: training is unchanged by checks), the
generator with batch statistics as the authors sample (buffers restored), the energy net in eval
mode. Other ranks receive the record, so every rank takes the same decision, and the figures are
the same on every number of processes (the weights are equal on all ranks; rank 0's BatchNorm
statistics are the saved ones).

Verdicts and reasons (`judge`): thresholds are `health.*` keys; their defaults and the evidence
that set them are in docs/health.md. Each check is one JSON line in RUN_DIR/health.jsonl
(`step`, `verdict`, `reasons`, `figures`, `restarts`); its last line is the run's verdict. A
restart (health.on_unhealthy=restart) appends an `event: restart` line; the history that
reasons such as "since step 800" are counted over drops the checks after the step restarted from.
A resumed run truncates the file to the lines its checkpoint had seen (`TrainState.health_lines`),
so a run resumed after a kill writes the same lines as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torchvision.transforms.functional import gaussian_blur

from . import objectives
from .config import ConfigError
from .errors import BidvlError
from .data import ShardError
from .evaluation import fid as fid_lib
from .evaluation.fid import frechet_distance, statistics
from .evaluation.gather import broadcast_from_main
from .evaluation.loading import load_run
from .evaluation.metrics import auroc, energies
from .evaluation.sampling import first_test_images, forward_in_mode, latents
from .io import write_text
from .run_dir import HEALTH_SNAPSHOT, RunDir
from .tracking import log_metrics

VERDICTS = ("healthy", "warning", "unhealthy")
NOISE_KINDS = ("uniform", "shaped", "constant", "blurred")
PROBE_SEED = 0  # the probe's latents and noise are the same for every run (figures comparable)
K_NEAREST = 5  # precision/recall/density/coverage neighbourhood (Naeem et al.'s default)


class UnhealthyRun(BidvlError, RuntimeError):
    """health.on_unhealthy=stop (or restarts used up): the run stopped; the message says why."""


# ---------------------------------------------------------------- the measures (pure functions)


def pixel_spread(images: torch.Tensor) -> float:
    """Mean over pixel positions of the std across the batch."""
    return float(images.flatten(1).std(0).mean())


def nearest_neighbour_distance(images: torch.Tensor) -> float:
    """Mean over images of the L2 distance to the nearest *other* image of the batch."""
    x = images.flatten(1).double()
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float(d.min(1).values.mean())


def high_frequency_energy(images: torch.Tensor) -> float:
    """Mean squared difference between the images and their 3x3 box blur (edges replicated)."""
    c = images.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1.0 / 9.0, dtype=images.dtype)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)
    return float((images - blurred).pow(2).mean())


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = K_NEAREST) -> dict:
    """Precision and recall (Kynkaenniemi et al. 2019) and density and coverage (Naeem et al.
    2020) of `fake` against `real` feature rows, with k-nearest-neighbour balls; what the `prdc`
    package computes, in torch (a few lines; no extra dependency)."""
    real, fake = real.flatten(1).double(), fake.flatten(1).double()
    k_real, k_fake = min(k, len(real) - 1), min(k, len(fake) - 1)
    rr, ff, rf = torch.cdist(real, real), torch.cdist(fake, fake), torch.cdist(real, fake)
    # the k-th neighbour other than itself: index k of the sorted row (index 0 is the 0 to itself)
    r_radius = rr.sort(1).values[:, k_real]
    f_radius = ff.sort(1).values[:, k_fake]
    inside_real = rf <= r_radius[:, None]  # (real i, fake j): fake j inside real i's ball
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float((rf <= f_radius[None, :]).any(1).double().mean()),
        "density": float(inside_real.double().sum(0).mean() / k_real),
        "coverage": float((rf.min(1).values <= r_radius).double().mean()),
    }


def gaussian_blurred(images: torch.Tensor) -> torch.Tensor:
    """Heavily blurred images: Gaussian blur with sigma = resolution / 8 (reflected borders)."""
    res = images.shape[-1]
    sigma = res / 8.0
    size = min(2 * math.ceil(2 * sigma) + 1, res - 1 if res % 2 == 0 else res)
    return gaussian_blur(images, [size, size], [sigma, sigma])


def noise_images(data: torch.Tensor, seed: int = PROBE_SEED) -> dict[str, torch.Tensor]:
    """The four kinds of noise of the module docstring, as many as `data` has rows, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    n, shape = len(data), data.shape[1:]
    u = torch.rand((n, *shape), generator=g)
    mean, std = data.mean(0, keepdim=True), data.std(0, keepdim=True)
    return {
        "uniform": u * 2 - 1,
        "shaped": (mean + std * math.sqrt(3.0) * (2 * u.roll(1, 0) - 1)).clamp(-1, 1),
        "constant": (torch.rand((n, 1, 1, 1), generator=g) * 2 - 1).expand(n, *shape).contiguous(),
        "blurred": gaussian_blurred(data),
    }


# ---------------------------------------------------------------- the probe and one check


class Probe:
    """The fixed inputs of every check: held-out images, latents, noise (CPU tensors)."""

    def __init__(self, cfg, data: torch.Tensor):
        self.data = data
        self.latents = latents(torch.arange(len(data)), cfg.model.latent_dim, PROBE_SEED)
        self.noise = noise_images(data)
        self.batch_size = min(len(data), cfg.eval.batch_size)
        self.data_spread = pixel_spread(data)
        self.data_nn = nearest_neighbour_distance(data)
        self.data_hf = high_frequency_energy(data)

    @classmethod
    def from_config(cls, cfg) -> "Probe":
        """The held-out images of `cfg`; when data.test is empty and data.train has no test split,
        the first training images instead (said once on stderr): checks still run, the AUROCs
        then rank training images against noise."""
        try:
            data = first_test_images(cfg, cfg.health.num_images, cfg.eval.batch_size)
        except ShardError as exc:
            if cfg.data.test:  # a held-out folder the user named: its error is theirs to see
                raise
            print(f"warning: health checks: {exc}; they use the first {cfg.health.num_images} images of "
                  f"{cfg.data.train} split {cfg.data.train_split} instead", file=sys.stderr, flush=True)
            try:
                data = first_test_images(cfg, cfg.health.num_images, cfg.eval.batch_size,
                                         source=(cfg.data.train, cfg.data.train_split))
            except ShardError as second:  # e.g. bad members that training skips (data.on_error=skip)
                raise ShardError(f"{exc}; and {second}") from None
        if len(data) < 2:
            raise ConfigError(f"health.num_images={cfg.health.num_images}: the held-out split has "
                              f"{len(data)} image(s); a check needs at least 2 (or set health.every=0)")
        return cls(cfg, data)


def _in_batches(fn, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


@torch.no_grad()
def measure(probe: Probe, energy_net, encoder, generator, extractor=None, device="cpu") -> dict:
    """The figures of one check (a flat dict of floats); the nets are left as they came, buffers
    and modes included. `energy_net` is what scores images (Objective.ood_scorer)."""
    bs = probe.batch_size
    samples = _in_batches(lambda h: forward_in_mode(generator, "train", h), probe.latents, bs, device)
    fig = {
        "spread": pixel_spread(samples) / max(probe.data_spread, 1e-12),
        "nn_ratio": nearest_neighbour_distance(samples) / max(probe.data_nn, 1e-12),
        "hf_ratio": high_frequency_energy(samples) / max(probe.data_hf, 1e-12),
    }
    recon = _in_batches(lambda v: forward_in_mode(generator, "train", forward_in_mode(encoder, "train", v)[0]),
                        probe.data, bs, device)
    fig["rmse"] = float((recon - probe.data).pow(2).mean().sqrt())

    def energy(x):
        return _in_batches(lambda v: energies(energy_net, v), x, bs, device).double().numpy()

    e_data, e_samples = energy(probe.data), energy(samples)
    fig["energy_data"], fig["energy_samples"] = float(e_data.mean()), float(e_samples.mean())
    fig["energy_gap"] = fig["energy_samples"] - fig["energy_data"]
    fig["energy_spread"] = float(torch.cat([torch.from_numpy(e_data), torch.from_numpy(e_samples)]).std())
    for kind, images in probe.noise.items():
        fig[f"auroc_{kind}"] = auroc(-e_data, -energy(images))
    if extractor is not None:
        real = _in_batches(extractor, probe.data, bs, device).double()
        fake = _in_batches(extractor, samples, bs, device).double()
        fig.update(prdc(real, fake))
        fig["fid_small"] = frechet_distance(*statistics(fake.numpy()), *statistics(real.numpy()))
    return fig


def feature_extractor(cfg, device):
    """The FID-style feature extractor of the evaluation settings (eval.features, or Inception with
    the weights bidvl.evaluation.fid finds), or None: feature measures are then skipped."""
    return fid_lib.feature_extractor(cfg.eval.features, cfg.eval.inception_weights, device, required=False)


def replay(run_dir: str | os.PathLike, checkpoint: str | int | None = "latest", device="cpu",
           features: str | None = None, num_images: int | None = None) -> tuple[int, dict]:
    """(step, figures) of the check a run's checkpoint (or export) gets, measured again in this
    process: what the training run wrote to health.jsonl at that step, whatever the number of
    processes it trained on. `features` replaces the run's eval.features and `num_images` its
    health.num_images (None: keep them)."""
    run = load_run(run_dir, checkpoint, device=device, ema=False)  # checks watch the trained generator
    if features is not None:
        run.cfg.eval.features = features
    if num_images is not None:
        run.cfg.health.num_images = num_images
    nets = run.nets
    scorer = objectives.build(run.cfg).ood_scorer(nets.energy_net, nets.encoder, nets.generator)
    figures = measure(Probe.from_config(run.cfg), scorer, nets.encoder, nets.generator,
                      feature_extractor(run.cfg, device), device)
    return run.step, figures


# ---------------------------------------------------------------- verdicts


def _since(history: list[dict], step: int, reason_key: str) -> int:
    """The first step of the unbroken run of checks, ending at `step`, that had `reason_key`."""
    first = step
    for record in reversed(history):
        if reason_key not in record.get("keys", ()):
            break
        first = record["step"]
    return first


def judge(figures: dict, logs: dict, history: list[dict], step: int, hc,
          energy_trained: bool = True) -> tuple[str, list[str], list[str]]:
    """(verdict, reasons, reason keys) of a check from its figures, the last logging window's
    logs and the earlier checks (`history`, oldest first); `hc` is cfg.health. Reasons before
    hc.warmup steps: only non-finite figures (samples of a young generator are blobs).
    `energy_trained` False (the VAE, scored by its ELBO, which training does not shape into an
    energy): a noise AUROC below health.min_auroc is a warning, not unhealthy (a VAE's ELBO ranks
    blurred images above data: docs/health.md)."""
    found: list[tuple[str, str, str]] = []  # (severity, key, text)

    def add(severity, key, text):
        found.append((severity, key, text))

    bad = sorted(k for k, v in {**figures, **{k: v for k, v in logs.items() if k.startswith(("loss/", "grad_norm/"))}}.items()
                 if isinstance(v, float) and not math.isfinite(v))
    if bad:
        add("unhealthy", "nonfinite", f"non-finite figures: {', '.join(bad)}")
    if step >= hc.warmup:
        if figures["spread"] < hc.min_spread:
            add("unhealthy", "spread", f"samples collapsed: spread {figures['spread']:.2f} of the data's")
        if figures["nn_ratio"] < hc.min_nn_ratio:
            add("unhealthy", "nn_ratio", f"samples near-duplicates: nearest-neighbour distance "
                                         f"{figures['nn_ratio']:.2f} of the data's")
        if figures["hf_ratio"] > hc.max_hf_ratio:
            add("warning", "hf_ratio", f"samples are texture: high-frequency energy {figures['hf_ratio']:.1f}x "
                                       f"the data's")
        if energy_trained and figures["energy_spread"] < hc.min_energy_spread:
            add("unhealthy", "energy_spread", f"the energy is flat: it varies by {figures['energy_spread']:.1g} over "
                                              f"data and samples (no learning signal for the generator)")
        for kind in NOISE_KINDS:
            a = figures[f"auroc_{kind}"]
            if a < hc.min_auroc:
                add("unhealthy" if energy_trained else "warning", f"auroc_{kind}",
                    f"the {'energy' if energy_trained else 'score'} ranks {kind} noise above data: AUROC {a:.2f}")
            elif a < hc.warn_auroc:
                add("warning", f"auroc_{kind}", f"the energy barely tells {kind} noise from data: AUROC {a:.2f}")
        best_rmse = min([r["figures"]["rmse"] for r in history if r["step"] >= hc.warmup] + [figures["rmse"]])
        if figures["rmse"] > hc.max_rmse_rise * best_rmse:
            add("warning", "rmse", f"reconstruction error rising: RMSE {figures['rmse']:.3f}, best {best_rmse:.3f}")
        if "fid_small" in figures:
            best = min([r["figures"]["fid_small"] for r in history if "fid_small" in r["figures"]
                        and r["step"] >= hc.warmup] + [figures["fid_small"]])
            if figures["fid_small"] > hc.max_fid_rise * best:
                add("warning", "fid_small", f"sample quality getting worse: FID-style {figures['fid_small']:.1f}, "
                                            f"best {best:.1f}")
    keys = [key for _, key, _ in found]
    reasons = [f"{text} since step {_since(history, step, key)}" if _since(history, step, key) < step else text
               for _, key, text in found]
    severities = [severity for severity, _, _ in found]
    verdict = "unhealthy" if "unhealthy" in severities else "warning" if severities else "healthy"
    return verdict, reasons, keys


# ---------------------------------------------------------------- the run's monitor


def read_records(run_dir: str | os.PathLike) -> list[dict]:
    """Every line of RUN_DIR/health.jsonl (checks and restart events), oldest first; [] if none."""
    path = RunDir(run_dir).health_log
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def history_of(records: list[dict]) -> list[dict]:
    """The checks that count for trends and "since": a restart drops the checks after its step."""
    history: list[dict] = []
    for record in records:
        if record.get("event") == "restart":
            history = [r for r in history if r["step"] <= record["step"]]
        else:
            history.append(record)
    return history


def verdict_of(source: str | os.PathLike, step: int | None = None) -> dict | None:
    """The health record of some weights: an export folder's health.json, else (a checkpoint
    folder RUN_DIR/checkpoints/step_N, or a run folder) the last check of the run's
    health.jsonl at or before `step` (None: the last); None when there is none."""
    source = Path(source)
    if (source / HEALTH_SNAPSHOT).is_file():
        return json.loads((source / HEALTH_SNAPSHOT).read_text())
    run_dir = (RunDir.of_checkpoint(source) or RunDir(source)).path
    checks = [r for r in history_of(read_records(run_dir)) if step is None or r["step"] <= step]
    return checks[-1] if checks else None


def write_export(folder: str | os.PathLike, record: dict | None) -> None:
    """The run's last check as the export's health.json (nothing when there was no check)."""
    if record is not None:
        (Path(folder) / HEALTH_SNAPSHOT).write_text(json.dumps(record, indent=1) + "\n")


def summary(record: dict | None) -> str:
    """One line: `healthy (step 1500)` or `unhealthy (step 800): reason; reason`."""
    if record is None:
        return "not checked (health.every=0 or no check yet)"
    head = f"{record['verdict']} (step {record['step']})"
    return head + (": " + "; ".join(record["reasons"]) if record["reasons"] else "")


def restart_seed(seed: int, restarts: int) -> int:
    """The noise seed after the `restarts`-th health restart of a run seeded `seed` (< 2**31, so
    that Accelerate's set_seed can add the process index)."""
    return int(np.random.SeedSequence([seed, restarts]).generate_state(1)[0]) % (2**31 - 2**16)


class HealthMonitor:
    """Runs the checks of one training run, keeps their history and RUN_DIR/health.jsonl."""

    def __init__(self, accelerator, cfg, objective):
        self.accelerator, self.cfg, self.objective = accelerator, cfg, objective
        self.path = RunDir(cfg.run.dir).health_log
        self.records: list[dict] = []
        self.probe = self.extractor = None  # the main process measures; the others receive
        problem = ""
        if accelerator.is_main_process:
            try:
                self.probe = Probe.from_config(cfg)
            except ShardError as exc:
                if cfg.data.test:  # a held-out folder the user named: its error is theirs to see
                    raise
                problem = str(exc)
            self.extractor = feature_extractor(cfg, accelerator.device) if self.probe is not None else None
        # Every rank agrees, or the others would wait for checks the main process does not run.
        problem = broadcast_from_main(accelerator, problem)
        self.enabled = not problem
        if problem:
            accelerator.print(f"warning: health checks are off for this run: no images to probe with ({problem})")

    @classmethod
    def for_run(cls, accelerator, cfg, objective, lines: int) -> "HealthMonitor | None":
        """The run's monitor, its health.jsonl cut back to the `lines` the resumed checkpoint had
        seen (0 for a new run: an old file is emptied); None when health.every=0 or there are no
        images to probe with (said in the log)."""
        if not cfg.health.every:
            return None
        monitor = cls(accelerator, cfg, objective)
        if not monitor.enabled:
            return None
        monitor.resume(lines)
        return monitor

    @property
    def lines(self) -> int:
        return len(self.records)

    @property
    def last(self) -> dict | None:
        """The last check's record (None before the first)."""
        history = self.history
        return history[-1] if history else None

    @property
    def history(self) -> list[dict]:
        return history_of(self.records)

    @property
    def verdict(self) -> str:
        """The last check's verdict ("" before the first check)."""
        history = self.history
        return history[-1]["verdict"] if history else ""

    def resume(self, lines: int) -> None:
        """Back to the first `lines` lines of health.jsonl (what the resumed checkpoint had seen):
        lines written after it came from steps the resumed run trains again."""
        records = read_records(self.cfg.run.dir)[:lines]
        self.records = records
        if self.accelerator.is_main_process:
            self._rewrite()

    def _rewrite(self) -> None:
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _append(self, record: dict) -> None:
        self.records.append(record)
        if self.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def check(self, step: int, nets: dict, logs: dict, restarts: int = 0) -> dict:
        """One check (every rank calls it; the main process measures, the others get its record):
        figures, verdict, reasons; appended to health.jsonl, logged to the trackers as health/*
        and as one plain line."""
        acc = self.accelerator
        record = None
        if acc.is_main_process:
            scorer = self.objective.ood_scorer(nets["energy"], nets["encoder"], nets["generator"])
            figures = measure(self.probe, scorer, nets["encoder"], nets["generator"], self.extractor, acc.device)
            verdict, reasons, keys = judge(figures, logs, self.history, step, self.cfg.health,
                                           energy_trained=self.objective.has_upper_level)
            record = {"step": step, "verdict": verdict, "reasons": reasons, "keys": keys,
                      "restarts": restarts, "figures": figures,
                      "train": {k: v for k, v in logs.items() if k.startswith(("loss/", "grad_norm/"))}}
        record = broadcast_from_main(acc, record)
        self._append(record)
        tags = {f"health/{k}": v for k, v in record["figures"].items() if math.isfinite(v)}
        tags["health/verdict"] = float(VERDICTS.index(record["verdict"]))  # 0 healthy, 1 warning, 2 unhealthy
        log_metrics(acc, tags, step)
        f = record["figures"]
        aurocs = " ".join(f"{k}={f[f'auroc_{k}']:.2f}" for k in NOISE_KINDS)
        acc.print(f"health step {step}: {record['verdict']}"
                  f"{' - ' + '; '.join(record['reasons']) if record['reasons'] else ''} "
                  f"[spread {f['spread']:.2f} nn {f['nn_ratio']:.2f} hf {f['hf_ratio']:.2f} auroc {aurocs} "
                  f"gap {f['energy_gap']:.3g} E-spread {f['energy_spread']:.2g} rmse {f['rmse']:.3f}"
                  f"{' fid ' + format(f['fid_small'], '.1f') if 'fid_small' in f else ''}]", flush=True)
        return record

    def unhealthy_for(self) -> int:
        """How many checks in a row, ending with the last, were unhealthy."""
        count = 0
        for record in reversed(self.history):
            if record["verdict"] != "unhealthy":
                break
            count += 1
        return count

    def restarted(self, from_step: int, to_step: int, restarts: int, noise_seed: int) -> None:
        """Records a restart (health.on_unhealthy=restart) from `from_step` back to `to_step`."""
        self._append({"step": to_step, "event": "restart", "from_step": from_step, "restarts": restarts,
                      "noise_seed": noise_seed})

    def act(self, trainer, step: int, logs: dict) -> bool:
        """A check of `trainer`'s nets (bidvl.engine.Trainer: the component acts on it), then
        health.on_unhealthy once `patience` checks in a row were unhealthy: warn (go on), stop
        (checkpoint, raise UnhealthyRun), restart (reload the newest checkpoint whose check was
        healthy, a new noise seed, the abandoned checkpoints removed and the restarted state saved
        at once, so a resume continues the restarted run). Returns True when it restarted."""
        hc = self.cfg.health
        record = self.check(step, trainer.unwrapped, logs, trainer.state.restarts)
        trainer.state.health, trainer.state.health_lines = record["verdict"], self.lines
        unhealthy_for = self.unhealthy_for()
        if hc.on_unhealthy == "warn" or unhealthy_for < hc.patience:
            return False
        why = f"unhealthy for {unhealthy_for} checks in a row at step {step}: {'; '.join(record['reasons'])}"
        if hc.on_unhealthy == "stop" or trainer.state.restarts >= hc.max_restarts:
            trainer.save_checkpoint()
            raise UnhealthyRun(f"run {why} (health.on_unhealthy={hc.on_unhealthy}" + (
                f", after {trainer.state.restarts} restarts: health.max_restarts={hc.max_restarts})"
                if hc.on_unhealthy == "restart" else ")") + "; checkpointed, see RUN_DIR/health.jsonl")
        loaded = trainer.checkpointer.restart_point(trainer.unwrapped, trainer.ema)
        if loaded is None:
            trainer.save_checkpoint()
            raise UnhealthyRun(f"run {why}; no checkpoint whose check was healthy to restart from "
                               "(health.on_unhealthy=restart); checkpointed")
        folder, state = loaded
        restarts = trainer.state.restarts + 1
        state.restarts, state.noise_seed = restarts, restart_seed(self.cfg.run.seed, restarts)
        state.budget_used_s = trainer.state.budget_used_s  # the abandoned steps count against the budget
        trainer.state = state
        set_seed(state.noise_seed, device_specific=True)  # the new noise; checkpointed from here on
        self.restarted(step, state.step, restarts, state.noise_seed)
        trainer.state.health_lines = self.lines
        trainer.set_learning_rates()
        trainer.checkpointer.discard_after(state.step)
        trainer.save_checkpoint()
        trainer.accelerator.print(f"health: run {why}; restarted from {folder.name} with noise seed "
                                  f"{state.noise_seed} (restart {restarts} of {hc.max_restarts})")
        return True
