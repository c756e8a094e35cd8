"""Samples and noise that are the same whatever the number of processes.

* Sample i's latent h_i ~ N(0, I) (and noise image i ~ U[-1, 1]) comes from its own torch
  generator seeded by (seed, stream, i): no global RNG is read or advanced (periodic evaluation
  leaves training's RNG alone) and the value does not depend on batch size or world size.
* Generation runs in fixed batches of global positions [b*B, (b+1)*B); batch b goes to rank
  b % world_size. A batch therefore holds the same latents whatever the world size, so even with
  BatchNorm in train mode (batch statistics, as the authors sample) the images are the same. The
  last batch is filled with latents past `count` so that it has B rows too; their images are
  dropped (index -1).
* `bn_mode="train"` runs the net in train mode and restores every buffer (BatchNorm running
  statistics, spectral-norm vectors) after each batch: sampling never changes the weights and each
  batch sees the same state. `bn_mode="eval"` uses the running statistics.

    images = sample_images(generator, 64, latent_dim=100, seed=0)          # one process
    for positions in dealt_batches(50_000, 100, rank, world_size): ...     # all ranks, same rounds
    pairs = reconstruction_pairs(encoder, generator, v)                     # v0, G(mu(v0)), v1, ...
    images, grid = sample_grid(run, 64)               # a loaded run (bidvl.evaluation.load_run)
    reconstructions, grid = reconstruction_grid(run, 32)
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from torchvision.utils import make_grid

from bidvl.data import eval_stream
from bidvl.data.remote import NetOptions

from .gather import progress, rounds
from .loading import heldout_data


BN_MODES = ("train", "eval")
STREAM_LATENT = 0
STREAM_UNIFORM = 1


def sample_seed(seed: int, stream: int, index: int) -> int:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream, int(index)]).generate_state(2)
    return ((int(state[1]) << 32) | int(state[0])) & ((1 << 63) - 1)  # non-negative, 63 bits


def latents(positions: torch.Tensor, latent_dim: int, seed: int) -> torch.Tensor:
    """(len(positions), latent_dim) standard normal; row k depends only on (seed, positions[k])."""
    rows = [torch.randn(latent_dim, generator=torch.Generator().manual_seed(
        sample_seed(seed, STREAM_LATENT, int(i)))) for i in positions]
    return torch.stack(rows)


def uniform_noise(positions: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(positions), *shape) uniform on [-1, 1); row k depends only on (seed, positions[k])."""
    rows = [torch.rand(shape, generator=torch.Generator().manual_seed(
        sample_seed(seed, STREAM_UNIFORM, int(i)))) for i in positions]
    return torch.stack(rows).mul_(2).sub_(1)


def dealt_batches(count: int, batch_size: int, rank: int = 0, world_size: int = 1
                  ) -> Iterator[Optional[torch.Tensor]]:
    """Per round, this rank's batch of global positions (batch_size of them, possibly past
    `count`), or None when it has no batch in the last round. Every rank yields the same number of
    rounds, so collectives inside the loop stay matched."""
    num_batches = math.ceil(count / batch_size)
    for round_ in range(math.ceil(num_batches / world_size)):
        b = round_ * world_size + rank
        yield torch.arange(b * batch_size, (b + 1) * batch_size) if b < num_batches else None


def index_of(positions: torch.Tensor, count: int) -> torch.Tensor:
    """Positions with those past `count` replaced by -1 (dropped after gathering)."""
    return torch.where(positions < count, positions, torch.full_like(positions, -1))


def local_batchnorm(module: nn.Module) -> nn.Module:
    """`module`, or a copy whose SyncBatchNorm layers are plain BatchNorm2d: train-mode sampling
    must use each batch's own statistics (the same whatever the world size) and must not start
    collectives on ranks that have a batch while others do not."""
    if not any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.SyncBatchNorm):
                plain = nn.BatchNorm2d(sub.num_features, sub.eps, sub.momentum, sub.affine,
                                       sub.track_running_stats).to(next(sub.buffers()).device)
                plain.load_state_dict(sub.state_dict())
                setattr(child, attr, plain)
    return module


@contextlib.contextmanager
def restored_buffers(module: nn.Module):
    """Buffers (BatchNorm statistics, spectral-norm vectors) are put back on exit (also used by the
    engine for its image grids)."""
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(module.buffers(), saved):
                b.copy_(s)


@torch.no_grad()
def forward_in_mode(module: nn.Module, mode: str, *inputs: torch.Tensor):
    """module(*inputs) in train or eval mode; the module's mode and buffers are left as they were."""
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode={mode!r}: expected one of {', '.join(BN_MODES)}")
    was_training = module.training
    try:
        if mode == "train":
            with restored_buffers(module):
                return module.train()(*inputs)
        return module.eval()(*inputs)
    finally:
        module.train(was_training)


def generate(generator: nn.Module, positions: torch.Tensor, latent_dim: int, seed: int,
             bn_mode: str = "train", device: torch.device | str = "cpu") -> torch.Tensor:
    """Images G(h_i) for the given global positions, float32 in [-1, 1] on `device`."""
    h = latents(positions, latent_dim, seed).to(device)
    return forward_in_mode(generator, bn_mode, h).float()


def sample_images(generator: nn.Module, num: int, latent_dim: int, seed: int = 0,
                  batch_size: int = 100, bn_mode: str = "train",
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The first `num` samples (one process), (num, C, H, W) in [-1, 1] on the CPU: the same images
    as the first `num` of an FID run with the same seed, batch size and bn_mode."""
    generator = local_batchnorm(generator)

    out = [generate(generator, positions, latent_dim, seed, bn_mode, device).cpu()
           for positions in progress(dealt_batches(num, batch_size), None, "samples", rounds(num, batch_size, 1))]
    return torch.cat(out)[:num]


@torch.no_grad()
def reconstruction_pairs(encoder: nn.Module, generator: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """(2B, C, H, W) float32: v[0], G(mu(v[0])), v[1], G(mu(v[1])), ... The nets run as they are
    (mode, autocast and buffers are the caller's business); mu is the encoder mean, no sampling."""
    reconstructions = generator(encoder(v)[0]).float()
    return torch.stack([v.float(), reconstructions], 1).flatten(0, 1)


def first_test_images(cfg, num: int, batch_size: int, source: tuple[str, str] | None = None) -> torch.Tensor:
    """The first `num` images (fewer if the split is smaller) of the run's test split (or of
    `source`, a (folder, split)), one process, read `batch_size` at a time; (N, C, H, W) in [-1, 1]
    on the CPU."""


    folder, split = source or heldout_data(cfg)
    real = []
    for images, _, index in eval_stream(folder, split, batch_size, net=NetOptions.of(cfg.data),
                                         resolution=cfg.data.resolution, channels=cfg.data.channels):
        real.append(images[index >= 0])
        if sum(len(r) for r in real) >= num:
            break
    return torch.cat(real)[:num]


def _grid(images: torch.Tensor, nrow: int) -> torch.Tensor:

    return make_grid(images.cpu(), nrow=nrow, normalize=True, value_range=(-1, 1))


def sample_grid(run, num: int, seed: int = 0, batch_size: int = 100, bn_mode: str = "train",
                device: torch.device | str = "cpu", nrow: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first `num` samples of `run` (see sample_images), their grid image); a loaded run's
    nets (bidvl.evaluation.load_run) are left as they were. nrow=0: about sqrt(num) per row."""
    images = sample_images(run.nets.generator, num, run.cfg.model.latent_dim, seed, batch_size,
                           bn_mode, device)
    return images, _grid(images, nrow or max(1, round(math.sqrt(len(images)))))


def reconstruction_grid(run, num: int, bn_mode: str = "train", device: torch.device | str = "cpu",
                        nrow: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(G(mu(v)) of the first `num` test images of `run`, the grid of image / reconstruction
    pairs); nets in `bn_mode`, left as they were. nrow=0: about sqrt(num) pairs per row."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r}: expected one of {', '.join(BN_MODES)}")
    real = first_test_images(run.cfg, num, min(num, 256)).to(device)
    encoder, generator = run.nets.encoder, run.nets.generator
    modes = encoder.training, generator.training
    try:
        with restored_buffers(encoder), restored_buffers(generator):
            pairs = reconstruction_pairs(encoder.train(bn_mode == "train"),
                                         generator.train(bn_mode == "train"), real)
    finally:
        encoder.train(modes[0])
        generator.train(modes[1])
    return pairs[1::2].contiguous(), _grid(pairs, nrow or 2 * max(1, round(math.sqrt(len(real) / 2))))
