"""SNGAN-style ResNet nets of the authors' BiDVL code (`models/res_ebm.py`, `models/res_inf_gen.py`,
`models/resblocks.py`), whose blocks are those of the Mimicry library's SNGAN.

Layouts (w = the width from the config; "xk" multiplies it):

    px   energy net / encoder trunk                          generator (4x4 map, then up-blocks)
    32   opt-block w, D-block w (down), D-block w, D-block w   w;   w, w, w
    64   opt-block w, D-blocks 2w 4w 8w 16w (all down)         16w; 8w, 4w, 2w, w
    128  as 64, then one D-block 16w without down              16w; 16w, 8w, 4w, 2w, w

At 32 px this is SNGAN's CIFAR net (the authors: energy and encoder width 128, generator 256); at
128 px, with w = 64, it is their CelebA-128 net (64 -> 1024, generator 1024 -> 64); the 64 px layout
is Mimicry's SNGAN-64, which the authors' ResEBM64 also uses (it has no 64 px encoder/generator
there: ours mirror the 128 px ones). The trunk ends in ReLU and a global sum-pool.

Two behaviours are the authors' (Mimicry's) code rather than the SNGAN paper, kept on purpose:
- D-blocks start with an in-place ReLU on their input, so the shortcut also sees relu(x). We write
  that explicitly (`x = F.relu(x)` before both branches).
- Up-blocks upsample bilinearly (align_corners=False), not by nearest neighbour. On CUDA, for
  NCHW tensors, `upsample2x` computes that from slices instead of calling F.interpolate (see there).

The encoder uses the energy net's trunk with spectral norm always on (the authors' encoder is built
from the same spectrally normalised D-blocks; it has no BatchNorm), spectrally normalised linear
layers to mu and logvar, and logvar = -softplus(.) <= 0 as in their code. The generator has no
spectral norm. Initialisation is not done here: the registry applies `model.init` (for this arch
by default `xavier_gains`' Xavier-uniform init, the authors'; docs/fidelity.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from bidvl.models.dcgan import energy_output_layer

RESOLUTIONS = (32, 64, 128)

# After the optimized first block (width w): (width multiplier, downsample) of each D-block.
DISCRIMINATOR_BLOCKS = {
    32: [(1, True), (1, False), (1, False)],
    64: [(2, True), (4, True), (8, True), (16, True)],
    128: [(2, True), (4, True), (8, True), (16, True), (16, False)],
}
# Width multiplier of the 4x4 map, then the output width multiplier of each (upsampling) G-block.
GENERATOR_BLOCKS = {
    32: (1, [1, 1, 1]),
    64: (16, [8, 4, 2, 1]),
    128: (16, [16, 8, 4, 2, 1]),
}


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return _spectral_norm(layer) if enabled else layer


class OptimizedDisBlock(nn.Module):
    """First D-block (SNGAN): conv3x3, ReLU, conv3x3, avg-pool; shortcut avg-pool then conv1x1."""

    def __init__(self, c_in: int, c_out: int, spectral_norm: bool = True):
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), spectral_norm)
        self.conv2 = _maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), spectral_norm)
        self.shortcut = _maybe_sn(nn.Conv2d(c_in, c_out, 1, 1, 0), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return residual + self.shortcut(F.avg_pool2d(x, 2))


class DisBlock(nn.Module):
    """D-block (SNGAN): ReLU, conv3x3 (hidden width = c_in), ReLU, conv3x3, [avg-pool]; the shortcut
    is conv1x1 then [avg-pool] when the width or size changes, identity otherwise."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, spectral_norm: bool = True):
        super().__init__()
        self.downsample = downsample
        self.conv1 = _maybe_sn(nn.Conv2d(c_in, c_in, 3, 1, 1), spectral_norm)
        self.conv2 = _maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), spectral_norm)
        self.shortcut = None
        if c_in != c_out or downsample:
            self.shortcut = _maybe_sn(nn.Conv2d(c_in, c_out, 1, 1, 0), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)  # the authors' ReLU is in place, so the shortcut sees relu(x) too
        residual = self.conv2(F.relu(self.conv1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        if self.downsample:
            residual, shortcut = F.avg_pool2d(residual, 2), F.avg_pool2d(shortcut, 2)
        return residual + shortcut


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling with align_corners=False: F.interpolate's values (equal in float64;
    within rounding in float32/bfloat16), computed from slices for NCHW tensors on CUDA.

    Why: PyTorch's CUDA kernel for NCHW tensors (`upsample_bilinear2d_out_frame` in
    aten/src/ATen/native/cuda/UpSampleBilinear2d.cu, 2.x sources) runs one thread per *output
    pixel*, each looping over batch x channels. The generator's first up-block at 128 px (4x4 ->
    8x8, 1024 channels, batch 36) thus runs 64 threads of 36,864 iterations each, on one SM of the
    GPU; its backward scatters with atomic adds. Here, per axis, the output's even and odd rows are
    lerps of each row with its clamped neighbour (weights 3/4, 1/4), interleaved: elementwise
    kernels over all elements, an atomic-free (deterministic) backward, fused by torch.compile.
    Not yet timed on a GPU: `tools/benchmark_upsample.py` times the choices on a given machine.
    F.interpolate stays on the CPU (where the slices are ~1.9x slower per generator pass;
    docs/benchmarks.md) and for channels_last tensors (whose CUDA kernel runs one thread per
    element, and whose layout the slices would not keep).
    """
    if x.device.type != "cuda" or x.is_contiguous(memory_format=torch.channels_last):
        return interpolate2x(x)
    return upsample2x_by_slices(x)


def interpolate2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 upsampling by F.interpolate (align_corners=False): what the authors' code runs."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def upsample2x_by_slices(x: torch.Tensor) -> torch.Tensor:
    """The slice formulation of `upsample2x`, on any device (exposed for tests and benchmarks).

    Along an axis of length n, source row i gives output rows 2i and 2i+1:
    out[2i] = 3/4 x[i] + 1/4 x[i-1] and out[2i+1] = 3/4 x[i] + 1/4 x[i+1], with x[-1] = x[0] and
    x[n] = x[n-1] (align_corners=False clamps the source index at the edges).
    """
    for dim in (2, 3):
        n = x.shape[dim]
        before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
        after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
        rows = torch.stack([torch.lerp(x, before, 0.25), torch.lerp(x, after, 0.25)], dim + 1)
        x = rows.flatten(dim, dim + 1)
    return x


class GenBlock(nn.Module):
    """Up-block (SNGAN): BN, ReLU, upsample x2, conv3x3, BN, ReLU, conv3x3; shortcut upsample x2
    then conv1x1. Bilinear upsampling, as the authors' code."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(upsample2x(F.relu(self.bn1(x))))
        residual = self.conv2(F.relu(self.bn2(residual)))
        return residual + self.shortcut(upsample2x(x))


class DiscriminatorTrunk(nn.Module):
    """SNGAN discriminator up to its last linear layer: v (B, C, R, R) -> features (B, F)."""

    def __init__(self, channels: int, resolution: int, width: int, spectral_norm: bool = True):
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"ResNet nets support resolutions {RESOLUTIONS}, got {resolution}")
        blocks: list[nn.Module] = [OptimizedDisBlock(channels, width, spectral_norm)]
        c = width
        for multiplier, downsample in DISCRIMINATOR_BLOCKS[resolution]:
            blocks.append(DisBlock(c, width * multiplier, downsample, spectral_norm))
            c = width * multiplier
        self.blocks = nn.Sequential(*blocks)
        self.width_out = c

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.sum(F.relu(self.blocks(v)), dim=(2, 3))  # global sum-pool


class ResNetEnergyNet(nn.Module):
    """E(v): SNGAN discriminator (the authors' ResEBM32/128). v (B, C, R, R) -> energies (B,)."""

    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 128,
        spectral_norm: bool = True,
        energy_output: str = "identity",
    ):
        super().__init__()
        self.trunk = DiscriminatorTrunk(channels, resolution, width, spectral_norm)
        self.head = _maybe_sn(nn.Linear(self.trunk.width_out, 1), spectral_norm)
        self.output = energy_output_layer(energy_output)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.output(self.head(self.trunk(v)).reshape(-1))


class ResNetEncoder(nn.Module):
    """q(h|v): the authors' ResEncoder32/128. v (B, C, R, R) -> mu, logvar <= 0 (B, latent)."""

    def __init__(self, channels: int, resolution: int, latent_dim: int, width: int = 128,
                 head_bias: bool = True):
        super().__init__()
        self.trunk = DiscriminatorTrunk(channels, resolution, width, spectral_norm=True)
        # The authors' ResEncoder128 has bias=False on both heads, their ResEncoder32 a bias.
        self.mu = _spectral_norm(nn.Linear(self.trunk.width_out, latent_dim, bias=head_bias))
        self.logvar = _spectral_norm(nn.Linear(self.trunk.width_out, latent_dim, bias=head_bias))

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(v)
        return self.mu(features), -F.softplus(self.logvar(features))


class ResNetGenerator(nn.Module):
    """G(h): SNGAN generator (the authors' ResDecoder32/128). h (B, latent_dim) -> v (B, C, R, R).

    Linear to a 4x4 map, upsampling G-blocks, BN, ReLU, conv3x3 to C channels, tanh.
    """

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int = 256):
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"ResNet nets support resolutions {RESOLUTIONS}, got {resolution}")
        top_multiplier, multipliers = GENERATOR_BLOCKS[resolution]
        c = width * top_multiplier
        self.top_width = c
        self.linear = nn.Linear(latent_dim, 4 * 4 * c)
        blocks = []
        for multiplier in multipliers:
            blocks.append(GenBlock(c, width * multiplier))
            c = width * multiplier
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.to_image = nn.Conv2d(c, channels, 3, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.linear(h.reshape(h.shape[0], -1)).view(h.shape[0], self.top_width, 4, 4)
        x = F.relu(self.bn(self.blocks(x)))
        return torch.tanh(self.to_image(x))


def xavier_gains(net: nn.Module) -> dict[nn.Module, float]:
    """The gain of the authors' (Mimicry's) Xavier-uniform init for each conv/linear layer of a
    ResNet net: sqrt(2) for the 3x3 convs inside the residual blocks (`resblocks.py`: c1, c2), 1
    for the 1x1 shortcuts, the linear layers and the generator's last conv (`res_ebm.py` l5/l7,
    `res_inf_gen.py` mu/var layers, l1, c5/c7). Biases and BatchNorm keep PyTorch's defaults."""
    inner = set()
    for block in net.modules():
        if isinstance(block, (OptimizedDisBlock, DisBlock, GenBlock)):
            inner.update((block.conv1, block.conv2))
    return {m: math.sqrt(2.0) if m in inner else 1.0
            for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
