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
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn


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
           for positions in dealt_batches(num, batch_size)]
    return torch.cat(out)[:num]
