"""DCGAN-style nets of the authors' BiDVL code (`models/ebm.py: ConvE`, `models/inf_gen.py: VAE`).

The authors write out one layer list per resolution (32, 64, 128); every list is the same pattern
with one more stride-2 stage per doubling of the resolution, so here the pattern is written once and
the number of stages is log2(resolution / 4). That reproduces their 32, 64 and 128 px layouts layer
for layer and extends them to 16 px (the tiny CPU default on digits), which they did not have.

Widths: `width` is the base width (the authors' Ebasec 64, Qbasec 48, Pbasec 48); it doubles at each
stride-2 stage of the energy net and the encoder, and the generator mirrors the encoder.

Initialisation is not done here: `registry.init_weights` sets it for all three nets.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

RESOLUTIONS = (16, 32, 64, 128)


def num_stages(resolution: int) -> int:
    """Stride-2 stages between the image and the 4x4 feature map."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"DCGAN nets support resolutions {RESOLUTIONS}, got {resolution}")
    return int(math.log2(resolution // 4))


def energy_output_layer(energy_output: str) -> nn.Module:
    """The output activation of an energy net: softplus (the authors' DCGAN code) or none."""
    return nn.Softplus() if energy_output == "softplus" else nn.Identity()


class DCGANEnergyNet(nn.Module):
    """E(v): the authors' `ConvE`. v (B, C, R, R) -> energies (B,).

    Per stage a 3x3 conv (widening) and a 4x4 stride-2 conv, LeakyReLU 0.1, no normalisation except
    spectral norm on every conv. At 4x4 a 3x3 conv widens once more and a 4x4 valid conv reduces to
    1x1; the head is two 1x1 convs. As in the authors' code there is no activation between the 4x4
    valid conv and the first 1x1 conv (two linear maps in a row); we keep it to match their net.
    All convs keep their bias.
    """

    def __init__(
        self,
        channels: int,
        resolution: int,
        width: int = 64,
        spectral_norm: bool = True,
        energy_output: str = "softplus",
    ):
        super().__init__()
        stages = num_stages(resolution)

        def conv(c_in, c_out, kernel, stride, padding):
            layer = nn.Conv2d(c_in, c_out, kernel, stride, padding)
            return _spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = []
        c_in = channels
        for stage in range(stages):  # R -> 4
            c_out = width * 2**stage
            layers += [conv(c_in, c_out, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True)]
            layers += [conv(c_out, c_out, 4, 2, 1), nn.LeakyReLU(0.1, inplace=True)]
            c_in = c_out
        c_top = width * 2**stages
        layers += [conv(c_in, c_top, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True)]
        layers += [conv(c_top, c_top, 4, 1, 0)]  # 4x4 -> 1x1
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            conv(c_top, c_top, 1, 1, 0), nn.LeakyReLU(0.1, inplace=True), conv(c_top, 1, 1, 1, 0)
        )
        self.output = energy_output_layer(energy_output)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.output(self.head(self.features(v)).reshape(-1))


class DCGANEncoder(nn.Module):
    """q(h|v): the inference half of the authors' `VAE`. v (B, C, R, R) -> mu, logvar (B, latent).

    A 3x3 conv, then per stage a 4x4 stride-2 conv doubling the width; BatchNorm and LeakyReLU 0.2
    after each (convs without bias before BatchNorm). Two 4x4 valid convs (with bias) give mu and
    logvar; logvar is unconstrained, as in the authors' code. `batchnorm=False` drops the
    BatchNorm layers (the convs stay bias-free): the Divergence triangle's encoder `_netI`.
    """

    def __init__(self, channels: int, resolution: int, latent_dim: int, width: int = 48,
                 batchnorm: bool = True):
        super().__init__()
        stages = num_stages(resolution)

        def conv_bn_lrelu(c_in, c_out, kernel, stride, padding):
            return [
                nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                *([nn.BatchNorm2d(c_out)] if batchnorm else []),
                nn.LeakyReLU(0.2, inplace=True),
            ]

        layers = conv_bn_lrelu(channels, width, 3, 1, 1)
        c = width
        for _ in range(stages):  # R -> 4
            layers += conv_bn_lrelu(c, 2 * c, 4, 2, 1)
            c *= 2
        self.features = nn.Sequential(*layers)
        self.mu = nn.Conv2d(c, latent_dim, 4, 1, 0)
        self.logvar = nn.Conv2d(c, latent_dim, 4, 1, 0)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(v)
        return self.mu(features).flatten(1), self.logvar(features).flatten(1)


class DCGANGenerator(nn.Module):
    """G(h): the generative half of the authors' `VAE`. h (B, latent) -> v (B, C, R, R) in [-1, 1].

    A 4x4 transposed conv from 1x1 to 4x4 at width `width * 2**stages`, then per stage a 4x4
    stride-2 transposed conv (the first keeps the width, the others halve it, ending at 2 * width);
    BatchNorm and ReLU after each. A 3x3 transposed conv (with bias) to C channels and tanh.
    """

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int = 48):
        super().__init__()
        stages = num_stages(resolution)

        def up_bn_relu(c_in, c_out, kernel, stride, padding):
            return [
                nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        c = width * 2**stages
        layers = up_bn_relu(latent_dim, c, 4, 1, 0)  # 1 -> 4
        for stage in range(stages):  # 4 -> R
            c_out = c if stage == 0 else c // 2
            layers += up_bn_relu(c, c_out, 4, 2, 1)
            c = c_out
        layers += [nn.ConvTranspose2d(c, channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.reshape(h.shape[0], -1, 1, 1))


class TriangleEnergyNet(nn.Module):
    """E(v) of the Divergence triangle (Han et al. 2019, enijkamp/triangle `train_cifar10.py`
    `_netE`). v (B, C, R, R) -> energies (B,).

    A 3x3 conv to `width`, then per stage a 4x4 stride-2 conv (widths 2w, 4w, 4w, ...: doubling,
    capped at 4w), LeakyReLU 0.2 after each, no normalisation; a 4x4 valid conv (with bias) to one
    output. The other convs have no bias. At 32 px: their five convs. Spectral norm only if asked
    (they have none); their energy is the identity of the output.
    """

    def __init__(self, channels: int, resolution: int, width: int = 64, spectral_norm: bool = False,
                 energy_output: str = "identity"):
        super().__init__()
        stages = num_stages(resolution)

        def conv(c_in, c_out, kernel, stride, padding, bias=False):
            layer = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=bias)
            return _spectral_norm(layer) if spectral_norm else layer

        layers: list[nn.Module] = [conv(channels, width, 3, 1, 1), nn.LeakyReLU(0.2)]
        c = width
        for stage in range(stages):  # R -> 4
            c_out = width * min(2 ** (stage + 1), 4)
            layers += [conv(c, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(conv(c, 1, 4, 1, 0, bias=True))  # 4x4 -> 1x1
        self.net = nn.Sequential(*layers)
        self.output = energy_output_layer(energy_output)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.output(self.net(v).reshape(-1))
