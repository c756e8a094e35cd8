"""What a run logs: each step's metrics, the window they are averaged over, timers, image grids.

    result = StepResult()                        # filled by the engine's phases
    result.add({"loss/recon": recon, ...})       # summed over micro-batches and lower steps
    result.set("grad_norm/energy_net", norm)     # once per step (the last optimizer step's)
    window = MetricsWindow(accelerator)
    with window.waiting_for_data(): batches = ...
    window.record(result, images=...)
    logs = window.flush(step, {"lr/energy_net": ...})   # means over steps and ranks -> trackers

The console (`Progress`): a tqdm bar on a terminal, one plain line per log window in a log file
(log.progress); `closing_lines` says how a training ended and where its model is.

Trackers (log.trackers: TensorBoard, W&B, MLflow, ... through Accelerate) are started by
`start_trackers`; scalars go to them through `log_metrics` (the one writer: the engine, health and
evaluation figures too), image grids through each one's image API (`log_images`); `log_final`
writes the final figures once per finished training. A write the file system refuses (a full disk,
a quota, an I/O error; TensorBoard's writer thread raises it at the next write) is a
`bidvl.io.WriteError` naming the errno and the folder: the run stops there with one line (exit 2),
its complete checkpoints untouched, as for a checkpoint that cannot be written.

Names are the tags: `loss/*` (the levels' losses and terms), `energy/{data,samples,gap}` (the upper
level's mean energies), `grad_norm/*`, `lr/*`, `perf/*`, `train/*`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from .config import ConfigError, flatten, to_dict
from .errors import BidvlError
from .evaluation.sampling import reconstruction_pairs, restored_buffers
from .io import WriteError, write_failure, write_text
from .run_dir import CARD_FILE, TRACKER_PROJECT, RunDir


class StepResult:
    """One bi-level step's metrics, as sums and counts (averaged when the window is flushed), the
    optimizer steps it skipped and whether one of them had a non-finite gradient: device tensors
    (bidvl.nonfinite reads them at sync steps), or 0 / False before the first optimizer step."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped: torch.Tensor | int = 0
        self.nonfinite: torch.Tensor | bool = False

    def add_optimizer_step(self, skipped: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """One optimizer step's outcome (bidvl.distributed.step_optimizer), on the device."""
        self.skipped = self.skipped + skipped.long()
        self.nonfinite = nonfinite | self.nonfinite

    def add(self, values: dict) -> None:
        """Per micro-batch values, averaged over all the adds of the window."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __getitem__(self, name: str) -> torch.Tensor:
        """The step's mean of `name`."""
        return self.sums[name] / self.counts[name]

    def set(self, name: str, value: torch.Tensor) -> None:
        """A once-per-step value (a later set in the same step replaces it)."""
        self.sums[name] = value
        self.counts[name] = 1


# Dense tensor-core peaks (TFLOP/s) of the GPUs bidvl is measured on, by precision, from the
# vendors' datasheets (no sparsity). Under "no" (fp32), cuDNN convolutions run in TF32 by default
# (torch.backends.cudnn.allow_tf32), so the TF32 peak is the ceiling of these convnets. Matched
# against torch.cuda.get_device_name in order; log.peak_tflops overrides (any other device).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "no": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "no": 494.7}),  # SXM (HBM3) and NVL-class names
    ("H200", {"bf16": 989.4, "fp16": 989.4, "no": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "no": 156.0}),
)


def peak_tflops(cfg, accelerator) -> float:
    """The peak TFLOP/s of one process's device for perf/mfu: log.peak_tflops when set, else the
    table's entry for this GPU and precision, else 0 (MFU unknown: not logged)."""
    if cfg.log.peak_tflops > 0:
        return float(cfg.log.peak_tflops)
    if accelerator.device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(accelerator.device)
    precision = str(accelerator.mixed_precision)
    return next((peaks.get(precision, 0.0) for key, peaks in PEAK_TFLOPS if key in name), 0.0)


def counting_flops(fn):
    """(fn(), the FLOPs it ran) by torch's FlopCounterMode (matmuls and convolutions, forward and
    backward, as MFU counts them). The mode only observes the operators it dispatches: fn's results
    are bit-identical to a plain call (tests/test_tracking.py)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


class MetricsWindow:
    """Steps since the last flush, their wall time, images and the time spent waiting for data.
    `step_flops` (FLOPs of one step on one process, when counted) and `peak` (TFLOP/s, 0 when
    unknown) give perf/tflops and perf/mfu."""

    def __init__(self, accelerator, step_flops: int = 0, peak: float = 0.0):
        self.accelerator = accelerator
        self.step_flops, self.peak = step_flops, peak
        self.steps: list[StepResult] = []
        self.t0 = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0  # seconds the main process was blocked on the data stream

    @contextlib.contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.data_wait += time.perf_counter() - start

    def record(self, result: StepResult, images: int) -> None:
        self.steps.append(result)
        self.images += images

    def drop_steps(self) -> None:
        """Forget the recorded steps (after a rollback); the clock and image count run on."""
        self.steps, self.data_wait = [], 0.0

    def flush(self, step: int, extra: dict) -> dict:
        """Means over the window's steps, averaged over ranks, with `extra` scalars and perf/*,
        sent to the trackers; starts a new window. Every rank calls it (one all-reduce)."""
        acc = self.accelerator
        elapsed = time.perf_counter() - self.t0
        names = sorted(self.steps[0].sums)
        means = []
        for k in names:
            total = sum(r.sums[k] for r in self.steps if k in r.sums)
            count = sum(r.counts[k] for r in self.steps if k in r.sums)
            means.append(torch.as_tensor(total / count, dtype=torch.float32, device=acc.device))
        reduced = acc.reduce(torch.stack(means), reduction="mean")
        logs = {k: v.item() for k, v in zip(names, reduced)}
        if "energy/data" in logs:  # not for the VAE, which has no upper level
            logs["energy/gap"] = logs["energy/samples"] - logs["energy/data"]
        logs.update(extra)
        logs["perf/images_per_sec"] = self.images / max(elapsed, 1e-9)
        logs["perf/step_ms"] = 1e3 * elapsed / len(self.steps)
        logs["perf/data_wait_fraction"] = self.data_wait / max(elapsed, 1e-9)  # main process's
        if acc.device.type == "cuda":  # this rank's peak since the start (all ranks alike under DDP)
            logs["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        if self.step_flops:  # achieved per process, over the window's whole time (data waits included)
            logs["perf/tflops"] = self.step_flops * len(self.steps) / max(elapsed, 1e-9) / 1e12
            if self.peak > 0:
                logs["perf/mfu"] = logs["perf/tflops"] / self.peak
        log_metrics(acc, logs, step)
        self.steps, self.t0, self.images, self.data_wait = [], time.perf_counter(), 0, 0.0
        return logs


# ------------------------------------------------------------------ the console

CONSOLE_LOSSES = ("energy/gap", "loss/recon", "loss/kl")  # shown when present, in this order


def duration(seconds: float) -> str:
    """`4s`, `3m05s`, `2h07m`, `3d04h`."""
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def progress_mode(cfg) -> str:
    """log.progress resolved: `auto` is a bar when stderr is a terminal, else lines."""
    if cfg.log.progress != "auto":
        return cfg.log.progress
    return "bar" if sys.stderr.isatty() else "lines"


class Progress:
    """Training progress on the main process's console. `bar`: tqdm on stderr, the gap and the
    reconstruction loss beside it. `lines` (a log file, a SLURM .out file, a pipe): at each log
    window one newline-terminated line on stdout, flushed:

        step 1200/5000 (24.0%) | 310 img/s, 206 ms/step | 4m12s, ETA 13m03s | gap 0.160 recon 89.5 | health: healthy

    The ETA is the steps left at the window's rate; with a time budget on the wall clock, the budget's
    end when that is sooner; on the process clock the budget left is shown beside it (CPU seconds,
    not wall seconds). Other ranks print nothing."""

    def __init__(self, accelerator, cfg, start: int):
        self.cfg, self.main = cfg, accelerator.is_main_process
        self.mode = progress_mode(cfg) if self.main else "off"
        self.t0 = time.perf_counter()
        self.bar = None
        if self.mode == "bar":

            self.bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def moved_to(self, step: int) -> None:
        """The run went back to `step` (a rollback or a restart)."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def logged(self, step: int, logs: dict, health: str = "", budget_used_s: float = 0.0) -> None:
        """A log window closed at `step` with `logs` (MetricsWindow.flush); `health`: the last verdict."""
        shown = " ".join(f"{k.split('/')[-1]} {logs[k]:.3g}" for k in CONSOLE_LOSSES if k in logs)
        if self.bar is not None:
            self.bar.set_postfix_str(shown)
            return
        if self.mode != "lines":
            return
        total, train = self.cfg.train.max_steps, self.cfg.train
        step_s = logs.get("perf/step_ms", float("nan")) / 1e3
        eta = (total - step) * step_s
        budget_s = train.time_budget_min * 60.0
        budget = ""
        if budget_s > 0:
            left = max(budget_s - budget_used_s, 0.0)
            if train.budget_clock == "wall":
                eta = min(eta, left)
            else:
                budget = f", budget {duration(left)} of {duration(budget_s)} left ({train.budget_clock} clock)"
        parts = [f"step {step}/{total} ({100.0 * step / total:.1f}%)",
                 f"{logs.get('perf/images_per_sec', float('nan')):.0f} img/s, {1e3 * step_s:.0f} ms/step"
                 + (f", {logs['perf/peak_memory_gib']:.1f} GiB peak" if "perf/peak_memory_gib" in logs else "")
                 + (f", MFU {100 * logs['perf/mfu']:.1f}%" if "perf/mfu" in logs else ""),
                 f"{duration(time.perf_counter() - self.t0)}, ETA "
                 + (duration(eta) if math.isfinite(eta) else "?") + budget]
        parts += [shown] if shown else []
        parts += [f"health: {health}"] if health else []
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def closing_lines(how: str, step: int, seconds: float, figures: dict, model: Path | None, run_dir: Path) -> list[str]:
    """What a training says when it ends: how and when it stopped, the final figures, where the model
    (and its card) went and how to load it, or how to resume."""
    lines = [f"training {how} at step {step} after {duration(seconds)}"]
    shown = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if shown:
        lines.append("final: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())))
    if model is not None:
        model = Path(model).resolve()
        lines.append(f"model: {model} (model card: {model / CARD_FILE}); load it with "
                     f"bidvl.load({str(model)!r}), or python launch/sample.py --run {run_dir} --out samples.png")
    else:
        lines.append(f"checkpoints: {RunDir(run_dir).checkpoints}; the same command resumes the run")
    return lines


# ------------------------------------------------------------------ trackers

# log.trackers name -> (module to import, what to pip install), for the error when one is missing.
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny"),
    "aim": ("aim", "aim"), "comet_ml": ("comet_ml", "comet-ml"), "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"), "swanlab": ("swanlab", "swanlab"), "trackio": ("trackio", "trackio"),
}
# How each tracker's `log_images` (Accelerate's) takes one HWC uint8 grid: as a batch of one, a list
# of one, or the image itself. MLflow's tracker has no log_images: mlflow.log_image is called.
# comet_ml, dvclive and trackio take no images through Accelerate: they get the scalars only.
IMAGE_FORM = {"tensorboard": "batch", "wandb": "list", "swanlab": "list", "aim": "image", "clearml": "image"}
_OUR_MLFLOW_URI = "BIDVL_MLFLOW_TRACKING_URI"  # the MLFLOW_TRACKING_URI that tracker_environment set


def tracker_names(cfg) -> list[str]:
    """log.trackers as a list; a ConfigError names a tracker whose package is not installed."""


    names = [n.strip() for n in cfg.log.trackers.split(",") if n.strip()]
    for name in names:
        module, package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.trackers={cfg.log.trackers}: the {name} tracker needs the package {package}, "
                              f"which is not installed (pip install {package}), or leave {name} out")
    return names


def tracker_environment(cfg, names: list[str]) -> None:
    """MLflow without MLFLOW_TRACKING_URI writes into the run folder (run.dir/mlruns, MLflow's file
    store), like TensorBoard, instead of a database in the working directory; set the variable to
    use a server or a database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    # A URI set for an earlier run in this process (the study, tests) is replaced; the user's is kept.
    if "mlflow" in names and (not uri or uri == os.environ.get(_OUR_MLFLOW_URI)):
        uri = RunDir(cfg.run.dir).mlruns.resolve().as_uri()
        os.environ["MLFLOW_TRACKING_URI"] = os.environ[_OUR_MLFLOW_URI] = uri
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in


def start_trackers(accelerator, cfg) -> None:
    """init_trackers. W&B and MLflow continue the run they started before a resume (ids kept in
    run.dir/trackers.json) and get the config as their parameters when their run is new.
    TensorBoard gets the config once, with the final figures, as hparams (`log_final`): its HParams
    tab shows one row per run instead of one empty row per start."""
    run_dir = Path(cfg.run.dir)
    ids_file = RunDir(run_dir).trackers  # the W&B / MLflow run ids: a resumed run continues its own
    ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
    name = run_dir.resolve().name
    wandb = {"name": name, "dir": str(run_dir)}
    mlflow = {"run_name": name}
    if "wandb" in ids:
        wandb.update(id=ids["wandb"], resume="allow")
    if "mlflow" in ids:
        mlflow.update(run_id=ids["mlflow"])
    accelerator.init_trackers(TRACKER_PROJECT, init_kwargs={"wandb": wandb, "mlflow": mlflow})
    if not accelerator.is_main_process:
        return
    _quiet_writer_threads()
    new_ids = dict(ids)
    for tracker in accelerator.trackers:
        if tracker.name in ("tensorboard",) or tracker.name in ids:
            continue
        tracker.store_init_configuration(flatten(to_dict(cfg)))
        if tracker.name == "wandb":
            new_ids["wandb"] = tracker.run.id
        elif tracker.name == "mlflow":
            new_ids["mlflow"] = tracker.active_run.info.run_id
    if new_ids != ids:
        write_text(ids_file, json.dumps(new_ids, indent=1) + "\n")


# The last training window's figures that go into the run's final figures (log_final).
FINAL_LOGS = ("loss/", "energy/")


def close_run(accelerator, cfg, progress: Progress, how: str, step: int, logs: dict, eval_figures: dict,
              model: Path | None, health) -> None:
    """The end of a training: the final figures (the last window's losses and energies, the last
    evaluation) to the trackers when the model was exported, the progress closed, the closing lines
    and the run's health (`health`: bidvl.health.HealthMonitor or None)."""
    final = {**{k: v for k, v in logs.items() if k.startswith(FINAL_LOGS)}, **eval_figures}
    if model is not None:
        log_final(accelerator, cfg, step, final)
    progress.close()
    for line in closing_lines(how, step, time.perf_counter() - progress.t0, final, model, Path(cfg.run.dir)):
        accelerator.print(line)
    if health is not None:
        from .health import summary  # (health logs through this module)

        accelerator.print(f"run health: {summary(health.history[-1] if health.history else None)} ({health.path})")


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread dies on a refused write and prints its traceback; the training
    thread gets the same error at the next write, where `tracker_writes` names it in one line. So
    an OSError ending a thread of the tensorboard package is not printed; every other thread's
    exception goes to the hook that was there. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "bidvl_quiet", False):
        return

    def hook(args):
        if issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.bidvl_quiet = True
    threading.excepthook = hook


@contextlib.contextmanager
def tracker_writes(accelerator, step: int):
    """Turns a refused write inside into a bidvl.io.WriteError naming the errno and the file (the
    error's, else the trackers' folder: TensorBoard's writer thread re-raises a bare OSError)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, BidvlError):  # named already
            raise
        where = accelerator.logging_dir or accelerator.project_dir or "."
        raise WriteError(f"cannot write the trackers' logs at step {step}: {write_failure(exc, where)}; "
                            f"the complete checkpoints are untouched") from None


def log_metrics(accelerator, values: dict, step: int) -> None:
    """Scalars to every tracker (Accelerate's log: main process only); see `tracker_writes`."""
    with tracker_writes(accelerator, step):
        accelerator.log(values, step=step)


def log_final(accelerator, cfg, step: int, figures: dict) -> None:
    """The run's final figures (the last training window's losses and the last evaluation during
    training) as `final/*` scalars to every tracker, and to TensorBoard as the metrics of the run's
    hparams (the config): once per finished training."""
    metrics = {f"final/{k}": float(v) for k, v in figures.items()
               if isinstance(v, (int, float)) and math.isfinite(v)}
    log_metrics(accelerator, metrics, step)
    if accelerator.is_main_process:
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                with tracker_writes(accelerator, step):
                    tracker.writer.add_hparams(flatten(to_dict(cfg)), metrics, run_name="hparams", global_step=step)


@torch.no_grad()
def log_image_grids(accelerator, step: int, generator, encoder, latents: torch.Tensor, real: torch.Tensor,
                    autocast) -> None:
    """Samples G(latents) and real/reconstruction pairs of up to 32 `real` images to the trackers
    that take images. Train-mode BatchNorm, as the authors sample, with every buffer restored:
    logging must not change training."""


    with restored_buffers(generator), restored_buffers(encoder), autocast:
        samples = generator(latents.to(accelerator.device)).float()
        pairs = reconstruction_pairs(encoder, generator, real[: min(32, len(real))])
    grids = {"samples": make_grid(samples, nrow=int(math.sqrt(len(samples))), normalize=True, value_range=(-1, 1)),
             "reconstructions": make_grid(pairs, nrow=8, normalize=True, value_range=(-1, 1))}
    log_images(accelerator, grids, step)


def log_images(accelerator, grids: dict[str, torch.Tensor], step: int) -> None:
    """CHW grids in [0, 1] to every tracker's image API (see IMAGE_FORM); main process only."""
    if not accelerator.is_main_process:
        return
    hwc = {k: g.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for k, g in grids.items()}
    with tracker_writes(accelerator, step):
        _log_images(accelerator, hwc, step)


def _log_images(accelerator, hwc: dict, step: int) -> None:
    for tracker in accelerator.trackers:
        form = IMAGE_FORM.get(tracker.name)
        if tracker.name == "mlflow":
            import mlflow

            for k, image in hwc.items():
                mlflow.log_image(image, key=k, step=step)
        elif form == "batch":
            tracker.log_images({k: image[None] for k, image in hwc.items()}, step=step, dataformats="NHWC")
        elif form == "list":
            tracker.log_images({k: [image] for k, image in hwc.items()}, step=step)
        elif form == "image":
            tracker.log_images(hwc, step=step)
