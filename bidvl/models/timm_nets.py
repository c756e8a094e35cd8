"""Energy net and encoder on a timm backbone (`model.arch=timm`, `model.timm_name=...`).

Not in the paper or the authors' code: an option to try other backbones under the same objective.
The backbone is `timm.create_model(name, pretrained=False, num_classes=0, in_chans=C)` (pooled
features, never downloaded weights) followed by our linear head. The generator for arch=timm is the
DCGAN generator (see registry.py).

Choices where nothing prescribes one:
- With `spectral_norm`, every conv and linear layer of the energy net (backbone and head) gets
  `torch.nn.utils.parametrizations.spectral_norm`, as the paper asks of its energy net. Norm layers
  the backbone may have (BatchNorm, LayerNorm) are kept as timm builds them.
- The backbone keeps timm's own initialisation (tuned per architecture, e.g. zero-initialised last
  BatchNorm of residual blocks); `registry.init_weights` only initialises our heads.
- The backbone is used at the data resolution as is: a backbone that fixes its input size (some
  ViTs) must accept it, otherwise timm raises when it is first called.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from bidvl.extras import require
from bidvl.models.dcgan import energy_output_layer

SPECTRAL_NORM_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


def create_backbone(timm_name: str, channels: int) -> nn.Module:

    timm = require("timm")  # imported here: it takes seconds, and only arch=timm needs it

    return timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=channels)


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectrally normalise every conv and linear weight inside `module` (in place)."""
    layers = [
        m for m in module.modules()
        if isinstance(m, SPECTRAL_NORM_LAYERS) and not parametrize.is_parametrized(m, "weight")
    ]
    for layer in layers:
        _spectral_norm(layer)
    return module


class TimmEnergyNet(nn.Module):
    """E(v) = output(linear(backbone(v))). v (B, C, R, R) -> energies (B,)."""

    def __init__(
        self,
        timm_name: str,
        channels: int,
        spectral_norm: bool = True,
        energy_output: str = "softplus",
    ):
        super().__init__()
        self.backbone = create_backbone(timm_name, channels)
        self.head = nn.Linear(self.backbone.num_features, 1)
        if spectral_norm:
            apply_spectral_norm(self)
        self.output = energy_output_layer(energy_output)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.output(self.head(self.backbone(v)).reshape(-1))


class TimmEncoder(nn.Module):
    """q(h|v): mu, logvar = split(linear(backbone(v))). v (B, C, R, R) -> two (B, latent_dim)."""

    def __init__(self, timm_name: str, channels: int, latent_dim: int):
        super().__init__()
        self.backbone = create_backbone(timm_name, channels)
        self.head = nn.Linear(self.backbone.num_features, 2 * latent_dim)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.backbone(v)).chunk(2, dim=1)
        return mu, logvar
