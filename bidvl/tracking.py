"""What a run logs: each step's metrics, the window they are averaged over, timers, image grids.

    result = StepResult()                        # filled by the engine's phases
    result.add({"loss/recon": recon, ...})       # summed over micro-batches and lower steps
    result.set("grad_norm/energy_net", norm)     # once per step (the last optimizer step's)
    window = MetricsWindow(accelerator)
    with window.waiting_for_data(): batches = ...
    window.record(result, images=...)
    logs = window.flush(step, {"lr/energy_net": ...})   # means over steps and ranks -> trackers

Names are the TensorBoard tags: `loss/*` (the levels' losses and terms), `energy/{data,samples,gap}`
(the upper level's mean energies), `grad_norm/*`, `lr/*`, `perf/*`, `train/*`.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch


class StepResult:
    """One bi-level step's metrics, as sums and counts (averaged when the window is flushed), and
    whether an optimizer step was skipped for a non-finite gradient."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.nonfinite = False

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


class MetricsWindow:
    """Steps since the last flush, their wall time, images and the time spent waiting for data."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
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
        acc.log(logs, step=step)
        self.steps, self.t0, self.images, self.data_wait = [], time.perf_counter(), 0, 0.0
        return logs


@torch.no_grad()
def log_image_grids(accelerator, step: int, generator, encoder, latents: torch.Tensor, real: torch.Tensor,
                    autocast) -> None:
    """Samples G(latents) and real/reconstruction pairs of up to 32 `real` images to TensorBoard.
    Train-mode BatchNorm, as the authors sample, with every buffer restored: logging must not
    change training."""
    from torchvision.utils import make_grid

    from .evaluation.sampling import reconstruction_pairs, restored_buffers

    with restored_buffers(generator), restored_buffers(encoder), autocast:
        samples = generator(latents.to(accelerator.device)).float()
        pairs = reconstruction_pairs(encoder, generator, real[: min(32, len(real))])
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    nrow = int(math.sqrt(len(samples)))
    writer.add_image("samples", make_grid(samples, nrow=nrow, normalize=True, value_range=(-1, 1)), step)
    writer.add_image("reconstructions", make_grid(pairs, nrow=8, normalize=True, value_range=(-1, 1)), step)


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
