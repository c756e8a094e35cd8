"""The three nets and their registry: `build_nets(model_cfg, channels, resolution)`.

Small widths keep these fast on a CPU; the layouts are the same at full width.
"""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from bidvl.config import ModelConfig
from bidvl.models import Nets, build_nets

BATCH = 2

# (model config, resolutions) with widths small enough for a quick CPU test.
SMALL = {
    "dcgan": (ModelConfig(arch="dcgan", latent_dim=16, energy_width=8, encoder_width=8,
                          generator_width=8), (16, 32, 64, 128)),
    "resnet": (ModelConfig(arch="resnet", latent_dim=16, energy_width=8, encoder_width=8,
                           generator_width=8, energy_output="identity"), (32, 64, 128)),
    "timm": (ModelConfig(arch="timm", latent_dim=16, generator_width=8, timm_name="test_resnet"),
             (32,)),
    "triangle": (ModelConfig(arch="triangle", latent_dim=16, energy_width=8, encoder_width=8,
                             generator_width=8, energy_output="identity", spectral_norm=False), (16, 32, 64, 128)),
}
CASES = [
    (arch, resolution, channels)
    for arch, (_, resolutions) in SMALL.items()
    for resolution in resolutions
    for channels in (1, 3)
]


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The trained weight tensor (under spectral norm: the parametrization's `original`)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


@pytest.mark.parametrize("arch,resolution,channels", CASES)
def test_shapes_dtypes_and_ranges(arch, resolution, channels):
    cfg = SMALL[arch][0]
    torch.manual_seed(0)
    nets = build_nets(cfg, channels=channels, resolution=resolution)
    assert isinstance(nets, Nets) and all(isinstance(net, nn.Module) for net in nets)

    v = torch.rand(BATCH, channels, resolution, resolution) * 2 - 1
    energy = nets.energy_net(v)
    mu, logvar = nets.encoder(v)
    x = nets.generator(torch.randn(BATCH, cfg.latent_dim))

    assert energy.shape == (BATCH,) and energy.dtype == torch.float32
    assert mu.shape == logvar.shape == (BATCH, cfg.latent_dim)
    assert mu.dtype == logvar.dtype == torch.float32
    assert x.shape == (BATCH, channels, resolution, resolution) and x.dtype == torch.float32
    assert x.abs().max() <= 1.0
    for t in (energy, mu, logvar, x):
        assert torch.isfinite(t).all()
    if cfg.energy_output == "softplus":
        assert (energy >= 0).all()


def test_energy_gradient_reaches_the_generator():
    """The lower level trains G through E(G(h)): E must pass gradients to its input."""
    nets = build_nets(SMALL["dcgan"][0], channels=1, resolution=16)
    x = nets.generator(torch.randn(BATCH, 16))
    nets.energy_net(x).mean().backward()
    grads = [p.grad for p in nets.generator.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch,resolution", [("dcgan", 32), ("resnet", 32)])
def test_energy_output_softplus_or_identity(arch, resolution):
    cfg = SMALL[arch][0]
    v = torch.rand(4, 3, resolution, resolution) * 2 - 1
    energies = {}
    for output in ("softplus", "identity"):
        torch.manual_seed(0)
        net = build_nets(dataclasses.replace(cfg, energy_output=output), 3, resolution).energy_net
        last_layer = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
        with torch.no_grad():
            last_layer.bias.fill_(-10.0)  # push the raw energies well below zero
        energies[output] = net(v)
    assert (energies["identity"] < 0).all()
    assert (energies["softplus"] >= 0).all()
    torch.testing.assert_close(F.softplus(energies["identity"]), energies["softplus"])


@pytest.mark.parametrize("arch,init", [("dcgan", "auto"), ("resnet", "normal")])
def test_init_normal_002_zero_bias_unit_batchnorm(arch, init):
    """model.init=normal (auto for dcgan: the DCGAN scripts' N(0, 0.02))."""
    cfg = dataclasses.replace(SMALL[arch][0], energy_width=16, encoder_width=16, generator_width=16, init=init)
    torch.manual_seed(0)
    nets = build_nets(cfg, channels=3, resolution=32)
    for net in nets:
        layers = [
            m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
        ]
        weights = torch.cat([weight_of(m).detach().flatten() for m in layers])
        assert weights.mean().abs() < 0.002
        assert 0.018 < weights.std() < 0.022
        for m in layers:
            if m.bias is not None:
                assert (m.bias == 0).all()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.bias == 0).all()


def test_resnet_init_is_the_authors_xavier_uniform():
    """model.init=auto for resnet: Xavier-uniform, gain sqrt(2) on the blocks' 3x3 convs and 1 on
    shortcuts, linear layers and the last conv; biases and BatchNorm at PyTorch's defaults."""
    cfg = dataclasses.replace(SMALL["resnet"][0], energy_width=32, encoder_width=32, generator_width=32)
    torch.manual_seed(0)
    nets = build_nets(cfg, channels=3, resolution=32)
    from bidvl.models.resnet import xavier_gains

    for net in nets:
        gains = xavier_gains(net)
        assert set(gains.values()) == {1.0, math.sqrt(2.0)}
        for layer, gain in gains.items():
            w = weight_of(layer).detach()
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound
            if w.numel() >= 1000:  # uniform on [-bound, bound]: std bound / sqrt(3)
                assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
            if layer.bias is not None:  # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not 0
                assert (layer.bias != 0).any() and layer.bias.abs().max() <= 1 / math.sqrt(fan_in)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert (m.weight == 1).all() and (m.bias == 0).all()
    # the generator's last conv and the shortcuts have gain 1, the blocks' 3x3 convs sqrt(2)
    block = nets.generator.blocks[0]
    assert gains_of(nets.generator)[block.conv1] == math.sqrt(2.0)
    assert gains_of(nets.generator)[block.shortcut] == gains_of(nets.generator)[nets.generator.to_image] == 1.0


def gains_of(net):
    from bidvl.models.resnet import xavier_gains

    return xavier_gains(net)


@pytest.mark.parametrize("resolution,bias", [(32, True), (64, False), (128, False)])
def test_resnet_encoder_heads_have_a_bias_only_at_32_px(resolution, bias):
    """The authors' ResEncoder32 heads have a bias, their ResEncoder128 heads bias=False."""
    encoder = build_nets(SMALL["resnet"][0], 3, resolution).encoder
    assert (encoder.mu.bias is not None, encoder.logvar.bias is not None) == (bias, bias)
    forced = build_nets(dataclasses.replace(SMALL["resnet"][0], encoder_heads="bias"), 3, 128).encoder
    assert forced.mu.bias is not None


def test_triangle_nets_are_han_et_al():
    """At 32 px: E = 5 convs (3x3 w, 4x4/2 to 2w, 4w, 4w, 4x4 valid to 1; only the last has a bias),
    LeakyReLU 0.2, no normalisation; the encoder has no BatchNorm; init N(0, 0.02), default biases,
    BatchNorm weight N(1, 0.02)."""
    torch.manual_seed(0)
    nets = build_nets(dataclasses.replace(SMALL["triangle"][0], energy_width=64, generator_width=64), 3, 32)
    convs = [m for m in nets.energy_net.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 3, 3), (128, 64, 4, 4), (256, 128, 4, 4),
                                                      (256, 256, 4, 4), (1, 256, 4, 4)]
    assert [c.bias is not None for c in convs] == [False] * 4 + [True]
    assert {m.negative_slope for m in nets.energy_net.modules() if isinstance(m, nn.LeakyReLU)} == {0.2}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nets.encoder.modules())
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert 0.018 < weights.std() < 0.022
    assert convs[-1].bias.item() != 0  # PyTorch's default bias
    bn = [m for m in nets.generator.modules() if isinstance(m, nn.BatchNorm2d)]
    gammas = torch.cat([m.weight.detach() for m in bn])
    assert 0.015 < gammas.std() < 0.025 and abs(gammas.mean() - 1) < 0.005
    assert all((m.bias == 0).all() for m in bn)


def test_spectral_norm_is_refreshed_after_init():
    """After init the power iteration belongs to the drawn weight: ||W / sigma||_2 is about 1."""
    nets = build_nets(SMALL["dcgan"][0], channels=3, resolution=32)
    conv = nets.energy_net.features[0]
    normalised = conv.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(normalised, 2).item() == pytest.approx(1.0, abs=0.05)


def _spectrally_normalised(net: nn.Module) -> list[bool]:
    return [
        parametrize.is_parametrized(m, "weight")
        for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]


@pytest.mark.parametrize("arch,resolution", [("dcgan", 32), ("resnet", 32), ("timm", 32), ("triangle", 32)])
def test_spectral_norm_on_energy_net_only_when_asked(arch, resolution):
    cfg = SMALL[arch][0]
    with_sn = build_nets(dataclasses.replace(cfg, spectral_norm=True), 3, resolution)
    without_sn = build_nets(dataclasses.replace(cfg, spectral_norm=False), 3, resolution)
    assert all(_spectrally_normalised(with_sn.energy_net))
    assert not any(_spectrally_normalised(without_sn.energy_net))
    assert not any(_spectrally_normalised(with_sn.generator))
    if arch == "resnet":  # the authors' ResNet encoder is built from spectrally normalised blocks
        assert all(_spectrally_normalised(without_sn.encoder))
    else:
        assert not any(_spectrally_normalised(with_sn.encoder))


@pytest.mark.parametrize("arch", ["dcgan", "resnet", "timm"])
def test_deepcopy_for_ema(arch):
    nets = build_nets(SMALL[arch][0], channels=3, resolution=32)
    v = torch.rand(BATCH, 3, 32, 32) * 2 - 1
    for net in nets:
        net.eval()
        clone = copy.deepcopy(net)
        x = v if net is not nets.generator else torch.randn(BATCH, 16)
        torch.testing.assert_close(clone(x), net(x))
        theirs = {id(p) for p in net.parameters()}
        assert not any(id(p) in theirs for p in clone.parameters())


def test_state_dict_round_trip():
    """What a checkpoint stores (spectral-norm vectors included) rebuilds the same nets."""
    cfg = SMALL["resnet"][0]
    torch.manual_seed(0)
    source = build_nets(cfg, 3, 32)
    torch.manual_seed(1)
    target = build_nets(cfg, 3, 32)
    v = torch.rand(BATCH, 3, 32, 32) * 2 - 1
    for mine, theirs in zip(source, target):
        theirs.load_state_dict(mine.state_dict())
        mine.eval(), theirs.eval()
        x = v if mine is not source.generator else torch.randn(BATCH, 16)
        torch.testing.assert_close(mine(x), theirs(x))


@pytest.mark.parametrize("channels", [1, 3])
def test_timm_backbone(channels):
    cfg = SMALL["timm"][0]
    nets = build_nets(cfg, channels=channels, resolution=32)
    assert nets.energy_net.backbone.default_cfg["architecture"] == "test_resnet"
    first_conv = next(m for m in nets.energy_net.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels
    assert all(_spectrally_normalised(nets.energy_net))
    # Our heads get the project init; the backbones keep timm's.
    for head in (nets.energy_net.head, nets.encoder.head):
        assert (head.bias == 0).all() and 0.01 < weight_of(head).std() < 0.03


@pytest.mark.parametrize(
    "arch,resolution", [("dcgan", 28), ("dcgan", 256), ("resnet", 16), ("timm", 28)]
)
def test_unsupported_resolution_names_the_keys(arch, resolution):
    cfg = dataclasses.replace(SMALL[arch][0], arch=arch)
    with pytest.raises(ValueError) as error:
        build_nets(cfg, channels=3, resolution=resolution)
    message = str(error.value)
    assert "model.arch" in message and "data.resolution" in message
    assert f"data.resolution={resolution}" in message and "32" in message


def test_unknown_arch_and_energy_output():
    with pytest.raises(ValueError, match="model.arch"):
        build_nets(ModelConfig(arch="vgg"), channels=3, resolution=32)
    with pytest.raises(ValueError, match="model.energy_output"):
        build_nets(ModelConfig(energy_output="tanh"), channels=3, resolution=32)


def test_config_allows_the_registrys_archs_and_energy_outputs():
    """The registry owns the lists: config validation takes its allowed values from there."""
    from bidvl.config import CHOICES, ConfigError, load_config
    from bidvl.models.registry import BUILDERS, ENERGY_OUTPUTS

    assert CHOICES["model.arch"] == tuple(BUILDERS) and CHOICES["model.energy_output"] == ENERGY_OUTPUTS
    with pytest.raises(ConfigError, match="model.arch='vgg': expected one of dcgan, resnet, timm"):
        load_config(None, ["model.arch=vgg"])


def test_cpu_state_dict_is_a_detached_contiguous_cpu_copy():
    from bidvl.models import cpu_state_dict

    net = build_nets(SMALL["resnet"][0], 3, 32).encoder
    state = cpu_state_dict(net)
    assert state.keys() == net.state_dict().keys()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
        assert torch.equal(tensor, net.state_dict()[name])


def _upsample_pair(upsample, x: torch.Tensor):
    """(upsample(x), its gradient for a fixed random upstream gradient) and the same for
    F.interpolate (bilinear x2, align_corners=False)."""
    out = []
    for fn in (upsample, lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)):
        leaf = x.detach().clone().requires_grad_()
        y = fn(leaf)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y.backward(g.to(device=y.device, dtype=y.dtype))
        out.append((y.detach().double().cpu(), leaf.grad.double().cpu()))
    return out


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1, 5), (1, 2, 4, 4), (2, 5, 7, 3), (3, 16, 8, 8)])
def test_upsample_by_slices_equals_bilinear_interpolate(shape):
    """The generator's upsampling on CUDA (resnet.upsample2x_by_slices): F.interpolate's values and
    gradients, edge rows included (1-pixel and odd sizes)."""
    from bidvl.models.resnet import upsample2x_by_slices

    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (y, gx), (y_ref, gx_ref) = _upsample_pair(upsample2x_by_slices, x)
    assert y.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-12)
    (y, gx), (y_ref, gx_ref) = _upsample_pair(upsample2x_by_slices, x.float())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-5)
    # bfloat16: two roundings (one per axis) instead of one, so at most about one unit in the last
    # place (2**-8 relative) apart
    (y, _), (y_ref, _) = _upsample_pair(upsample2x_by_slices, x.bfloat16())
    assert ((y - y_ref).abs() <= 2**-7 * y_ref.abs().clamp_min(1)).all()


def test_upsample_uses_interpolate_on_the_cpu():
    from bidvl.models.resnet import upsample2x

    x = torch.randn(2, 4, 5, 6)
    reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(upsample2x(x), reference)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert upsample2x(cl).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsample_on_cuda_equals_interpolate(dtype):
    """On CUDA, NCHW tensors take the slice path: same values and gradients as F.interpolate within
    the dtype's rounding; channels_last tensors keep F.interpolate (and their layout)."""
    from bidvl.models.resnet import upsample2x

    x = torch.randn(4, 64, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = x.to("cuda", dtype)
    (y, gx), (y_ref, gx_ref) = _upsample_pair(upsample2x, x)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((y - y_ref).abs() <= tol * y_ref.abs().clamp_min(1)).all()
    assert ((gx - gx_ref).abs() <= 4 * tol * gx_ref.abs().clamp_min(1)).all()
    cl = x.contiguous(memory_format=torch.channels_last)
    assert upsample2x(cl).is_contiguous(memory_format=torch.channels_last)


def test_ema_after_k_updates_is_the_closed_form():
    """ema_k = d^k p_0 + (1 - d) sum_i d^(k-i) p_i for the parameters; buffers are copied; the EMA
    net is a copy (the trained net is untouched)."""
    from bidvl.models.ema import EMA

    net = nn.Linear(3, 2)
    net.register_buffer("seen", torch.zeros(2))
    start = [p.detach().clone() for p in net.parameters()]
    decay, values = 0.9, []
    ema = EMA(net, decay)
    torch.manual_seed(0)
    for k in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn_like(p))
            net.seen.fill_(k)
        values.append([p.detach().clone() for p in net.parameters()])
        ema.update(net)
    for j, ema_p in enumerate(ema.module.parameters()):
        expected = decay ** 5 * start[j] + sum((1 - decay) * decay ** (4 - i) * values[i][j] for i in range(5))
        torch.testing.assert_close(ema_p, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(ema.module.seen, torch.full((2,), 4.0))
    assert all(torch.equal(p, v) for p, v in zip(net.parameters(), values[-1]))
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_warmup_ramps_the_decay_and_start_from_copies_the_net():
    """train.ema_warmup: decay min(decay, (1 + k) / (10 + k)) at the k-th update; without it the
    decay from the first update; start_from makes the EMA a copy (parameters and buffers)."""
    from bidvl.models.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(net, 0.99, warmup=True)
    assert [ema.decay_at(k) for k in (0, 1, 8, 10_000)] == [0.1, 2 / 11, 0.5, 0.99]
    assert EMA(net, 0.99).decay_at(0) == 0.99
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.add_(2.0)
    ema.update(net, updates=1)
    for e, b, p in zip(ema.module.parameters(), before, net.parameters()):
        torch.testing.assert_close(e, 2 / 11 * b + 9 / 11 * p)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    fresh = EMA(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)), 0.99)
    fresh.start_from(net)
    for e, t in zip([*fresh.module.parameters(), *fresh.module.buffers()], [*net.parameters(), *net.buffers()]):
        assert torch.equal(e, t)
