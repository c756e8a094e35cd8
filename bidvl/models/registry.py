"""Build the three BiDVL nets from the `model` config.

    nets = build_nets(model_cfg, channels=3, resolution=32)
    e = nets.energy_net(v)          # (B, C, R, R) in [-1, 1] -> (B,) energies
    mu, logvar = nets.encoder(v)    # each (B, latent_dim)
    x = nets.generator(h)           # (B, latent_dim) -> (B, C, R, R), tanh output

One builder per `model.arch` (the BUILDERS table at the bottom); each returns initialised nets.
BUILDERS and ENERGY_OUTPUTS are the allowed values of `model.arch` and `model.energy_output` that
bidvl.config checks: a new arch is one builder and its RESOLUTIONS entry here.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from bidvl.models import dcgan, resnet, timm_nets

ENERGY_OUTPUTS = ("softplus", "identity")


class Nets(NamedTuple):
    energy_net: nn.Module
    encoder: nn.Module
    generator: nn.Module


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as detached, contiguous CPU tensors (what safetensors writes)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def init_weights(module: nn.Module) -> None:
    """Conv/linear weights N(0, 0.02), biases 0; BatchNorm weight 1, bias 0 (the authors' init).

    Use as `net.apply(init_weights)`. A spectrally normalised layer (this package applies
    `torch.nn.utils.parametrizations.spectral_norm` with its defaults) trains
    `parametrizations.weight.original`; we take the parametrization off, draw the weight and put
    spectral norm back, whose construction runs 15 power iterations on the new weight (its first
    sigma estimate is then within a few percent of the largest singular value). The authors'
    `Xavier_init` draws `m.weight.data` before the first forward, while their hook-based spectral
    norm's `weight` is still `weight_orig.data`, the same storage: their draw does reach
    `weight_orig`, as ours reaches `original`. What differs is where the power iteration starts:
    their `weight_u`, `weight_v` stay the random vectors drawn when the hook was applied
    (docs/fidelity.md, "Spectral norm").
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            nn.init.normal_(module.weight, 0.0, 0.02)
            spectral_norm(module)
        else:
            nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _redrawn(module: nn.Module, draw: Callable[[torch.Tensor], None]) -> None:
    """Draws `module.weight` with `draw`; under spectral norm the trained `original`, with the
    parametrization put back so that its power iteration starts from the new weight (15 iterations
    at construction; the authors' hook kept the random vectors it was built with, see
    `init_weights`)."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        draw(module.weight)
        spectral_norm(module)
    else:
        draw(module.weight)


def xavier_init(net: nn.Module) -> None:
    """The authors' ResNet init (`model.init=xavier`): Xavier-uniform weights with the gains of
    `resnet.xavier_gains`; biases and BatchNorm keep PyTorch's defaults."""
    with torch.no_grad():
        for module, gain in resnet.xavier_gains(net).items():
            _redrawn(module, lambda w, gain=gain: nn.init.xavier_uniform_(w, gain))


def triangle_init(net: nn.Module) -> None:
    """Han et al.'s `weights_init` (`model.init=triangle`): conv and transposed-conv weights
    N(0, 0.02), biases at PyTorch's default, BatchNorm weight N(1, 0.02) and bias 0."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                _redrawn(module, lambda w: nn.init.normal_(w, 0.0, 0.02))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)


INITS = {"normal": lambda net: net.apply(init_weights), "xavier": xavier_init, "triangle": triangle_init}
# model.init=auto: what the authors' scripts for each arch do (docs/fidelity.md).
AUTO_INIT = {"resnet": "xavier", "triangle": "triangle"}


def resolved_init(cfg) -> str:
    """model.init with `auto` replaced by the arch's authors' choice (normal for dcgan and timm)."""
    init = getattr(cfg, "init", "auto")
    return AUTO_INIT.get(cfg.arch, "normal") if init == "auto" else init


def _initialised(nets: Nets, cfg) -> Nets:
    init = resolved_init(cfg)
    if init not in INITS:
        raise ValueError(f"model.init={init!r}: expected auto or one of {', '.join(INITS)}")
    for net in nets:
        INITS[init](net)
    return nets


def build_dcgan(cfg, channels: int, resolution: int) -> Nets:
    """The authors' DCGAN nets (CIFAR-10, CelebA-32/64): width 64 / 48 / 48, latent 100."""
    return _initialised(Nets(
        energy_net=dcgan.DCGANEnergyNet(
            channels, resolution, cfg.energy_width, cfg.spectral_norm, cfg.energy_output
        ),
        encoder=dcgan.DCGANEncoder(channels, resolution, cfg.latent_dim, cfg.encoder_width),
        generator=dcgan.DCGANGenerator(cfg.latent_dim, channels, resolution, cfg.generator_width),
    ), cfg)


def encoder_head_bias(cfg, resolution: int) -> bool:
    """model.encoder_heads, `auto` resolved as the authors: no bias on the ResNet encoder's heads
    from 64 px up (their ResEncoder128; our 64 px encoder mirrors it), a bias at 32 px."""
    heads = getattr(cfg, "encoder_heads", "auto")
    if heads != "auto":
        return heads == "bias"
    return not (cfg.arch == "resnet" and resolution >= 64)


def build_resnet(cfg, channels: int, resolution: int) -> Nets:
    """The authors' SNGAN ResNet nets. Their settings: 32 px widths 128 / 128 / 256, 128 px widths
    64 / 64 / 64 (i.e. 64 -> 1024), latent 128, identity energy output (hinge upper loss)."""
    return _initialised(Nets(
        energy_net=resnet.ResNetEnergyNet(
            channels, resolution, cfg.energy_width, cfg.spectral_norm, cfg.energy_output
        ),
        encoder=resnet.ResNetEncoder(channels, resolution, cfg.latent_dim, cfg.encoder_width,
                                     head_bias=encoder_head_bias(cfg, resolution)),
        generator=resnet.ResNetGenerator(cfg.latent_dim, channels, resolution, cfg.generator_width),
    ), cfg)


def build_triangle(cfg, channels: int, resolution: int) -> Nets:
    """The Divergence triangle's nets (Han et al. 2019, enijkamp/triangle `train_cifar10.py`):
    their 5-conv energy net `_netE`, the encoder `_netI` (our DCGAN encoder without BatchNorm) and
    the DCGAN generator `_netG` (the same layout as ours). Their widths: 64 / 64 / 64, latent 100;
    they use model.spectral_norm=false and model.energy_output=identity."""
    return _initialised(Nets(
        energy_net=dcgan.TriangleEnergyNet(
            channels, resolution, cfg.energy_width, cfg.spectral_norm, cfg.energy_output
        ),
        encoder=dcgan.DCGANEncoder(channels, resolution, cfg.latent_dim, cfg.encoder_width, batchnorm=False),
        generator=dcgan.DCGANGenerator(cfg.latent_dim, channels, resolution, cfg.generator_width),
    ), cfg)


def build_timm(cfg, channels: int, resolution: int) -> Nets:
    """timm backbones for the energy net and the encoder, the DCGAN generator."""
    nets = Nets(
        energy_net=timm_nets.TimmEnergyNet(
            cfg.timm_name, channels, cfg.spectral_norm, cfg.energy_output
        ),
        encoder=timm_nets.TimmEncoder(cfg.timm_name, channels, cfg.latent_dim),
        generator=dcgan.DCGANGenerator(cfg.latent_dim, channels, resolution, cfg.generator_width),
    )
    init = INITS[resolved_init(cfg)]
    init(nets.energy_net.head)  # the backbones keep timm's own init
    init(nets.encoder.head)
    init(nets.generator)
    return nets


BUILDERS: dict[str, Callable[..., Nets]] = {
    "dcgan": build_dcgan,
    "resnet": build_resnet,
    "timm": build_timm,
    "triangle": build_triangle,
}
RESOLUTIONS = {
    "dcgan": dcgan.RESOLUTIONS,
    "resnet": resnet.RESOLUTIONS,
    "timm": dcgan.RESOLUTIONS,  # set by its DCGAN generator
    "triangle": dcgan.RESOLUTIONS,
}


def _supported() -> str:
    return "; ".join(
        f"model.arch={arch} with data.resolution in {', '.join(map(str, res))}"
        for arch, res in RESOLUTIONS.items()
    )


def build_nets(cfg, channels: int, resolution: int) -> Nets:
    """Build (energy_net, encoder, generator) for `cfg` (a `bidvl.config.ModelConfig`)."""
    if cfg.arch not in BUILDERS:
        raise ValueError(f"model.arch={cfg.arch!r} is not known; supported: {_supported()}")
    if resolution not in RESOLUTIONS[cfg.arch]:
        raise ValueError(
            f"model.arch={cfg.arch} does not support data.resolution={resolution}; "
            f"supported: {_supported()}"
        )
    if cfg.energy_output not in ENERGY_OUTPUTS:
        raise ValueError(
            f"model.energy_output={cfg.energy_output!r}: "
            f"expected one of {', '.join(ENERGY_OUTPUTS)}"
        )
    if channels < 1:
        raise ValueError(f"data.channels={channels}: expected a positive number of channels")
    if cfg.arch == "timm" and not cfg.timm_name:
        raise ValueError("model.timm_name is empty: model.arch=timm needs a timm model name")
    return BUILDERS[cfg.arch](cfg, channels, resolution)
