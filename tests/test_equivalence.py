"""Our engine's step against the authors' code, step by step (`pytest -k equivalence`).

For each workload, one full iteration of `Trainer.train_step` (the objective object, the
optimizers and the phases exactly as a run uses them, built from the shipped config with tiny
widths) is compared with a *reference transcription* of the authors' training step written below
in plain PyTorch: their nets (`models/ebm.py`, `models/inf_gen.py`, `models/res_ebm.py`,
`models/res_inf_gen.py`, `models/resblocks.py` of gekanFAE/BiDVL; `_netE`, `_netI`, `_netG` of
enijkamp/triangle `train_cifar10.py`) with their `nn.utils.spectral_norm` hook, their losses and
their optimizers with the hyperparameters of their scripts, written out here, not read from our
config. Nothing from the project is used on the reference side; only our nets' initial weights
are copied in. Float64, identical weights, data and noise (both sides draw the reparameterisation
and lower-level noise from torch's global generator in the same order, seeded the same).
Every gradient that reaches an optimizer and every updated weight must agree to 1e-6 relative
(max |ours - theirs| / max |theirs| per tensor; for a gradient, max |theirs| is taken at least
1e-6 of its net's largest gradient entry, since some are zero in exact arithmetic, e.g. the bias
of a conv followed by BatchNorm); BatchNorm running statistics too.

Spectral norm: theirs is the old hook (one power iteration per forward: four energy forwards per
DCGAN step, three per ResNet step), ours the parametrization (one iteration per forward, the upper
level on cat(v, v_hat)); the iterations also run in another order (u first vs v first). What the
two estimate is the same largest singular value; to compare the maths of the step rather than the
convergence state of the estimators, both start here from the exact singular vectors of every
weight and run POWER_ITERATIONS per forward, so both hold the exact sigma at every forward. What
one iteration per forward changes is measured separately (docs/fidelity.md).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm

TOLERANCE = 1e-6
POWER_ITERATIONS = 20
BATCH = 4

# ---------------------------------------------------------------- reference nets (the authors')


def sn(layer):
    return nn.utils.spectral_norm(layer)  # the authors' (old, hook-based) spectral norm


class RefConvE(nn.Module):
    """models/ebm.py ConvE (32/64/128 px lists are one pattern: 3x3 widen + 4x4 stride 2 per stage)."""

    def __init__(self, channels, resolution, basec):
        super().__init__()
        layers, c_in = [], channels
        for stage in range(int(math.log2(resolution // 4))):
            c = basec * 2**stage
            layers += [sn(nn.Conv2d(c_in, c, 3, 1, 1, bias=True)), nn.LeakyReLU(0.1, inplace=True),
                       sn(nn.Conv2d(c, c, 4, 2, 1, bias=True)), nn.LeakyReLU(0.1, inplace=True)]
            c_in = c
        top = 2 * c_in
        layers += [sn(nn.Conv2d(c_in, top, 3, 1, 1, bias=True)), nn.LeakyReLU(0.1, inplace=True),
                   sn(nn.Conv2d(top, top, 4, 1, 0))]
        self.vnet = nn.Sequential(*layers)
        self.enet = nn.Sequential(sn(nn.Conv2d(top, top, 1, 1, 0)), nn.LeakyReLU(0.1, inplace=True),
                                  sn(nn.Conv2d(top, 1, 1, 1, 0)))

    def energy(self, v):  # Eactivate = softplus
        return F.softplus(self.enet(self.vnet(v)).squeeze())


class RefQ(nn.Module):
    """The inference half of models/inf_gen.py VAE (qnet, mu_layer, var_layer)."""

    def __init__(self, channels, resolution, h_dim, basec, batchnorm=True, slope=0.2):
        super().__init__()
        c, layers = basec, [nn.Conv2d(channels, basec, 3, 1, 1, bias=False)]
        layers += [nn.BatchNorm2d(basec)] if batchnorm else []
        layers += [nn.LeakyReLU(slope, inplace=True)]
        for _ in range(int(math.log2(resolution // 4))):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False)]
            layers += [nn.BatchNorm2d(2 * c)] if batchnorm else []
            layers += [nn.LeakyReLU(slope, inplace=True)]
            c *= 2
        self.qnet = nn.Sequential(*layers)
        self.mu_layer = nn.Conv2d(c, h_dim, 4, 1, 0)
        self.var_layer = nn.Conv2d(c, h_dim, 4, 1, 0)

    def forward(self, v):  # (B, h, 1, 1) each, as theirs
        out = self.qnet(v)
        return self.mu_layer(out), self.var_layer(out)


class RefP(nn.Module):
    """The generative half of models/inf_gen.py VAE (pnet); also triangle's _netG."""

    def __init__(self, channels, resolution, h_dim, basec):
        super().__init__()
        stages = int(math.log2(resolution // 4))
        c = basec * 2**stages
        layers = [nn.ConvTranspose2d(h_dim, c, 4, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        for stage in range(stages):
            c_out = c if stage == 0 else c // 2
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c = c_out
        layers += [nn.ConvTranspose2d(c, channels, 3, 1, 1), nn.Tanh()]
        self.pnet = nn.Sequential(*layers)

    def forward(self, h):
        return self.pnet(h.view(h.shape[0], -1, 1, 1))


class DBlockOptimized(nn.Module):  # models/resblocks.py
    def __init__(self, c_in, c_out):
        super().__init__()
        self.c1, self.c2 = sn(nn.Conv2d(c_in, c_out, 3, 1, 1)), sn(nn.Conv2d(c_out, c_out, 3, 1, 1))
        self.c_sc = sn(nn.Conv2d(c_in, c_out, 1, 1, 0))
        self.activation = nn.ReLU(True)

    def forward(self, x):
        h = F.avg_pool2d(self.c2(self.activation(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DBlock(nn.Module):  # models/resblocks.py: the in-place ReLU also changes x for the shortcut
    def __init__(self, c_in, c_out, downsample):
        super().__init__()
        self.downsample, self.learnable_sc = downsample, c_in != c_out or downsample
        self.c1, self.c2 = sn(nn.Conv2d(c_in, c_in, 3, 1, 1)), sn(nn.Conv2d(c_in, c_out, 3, 1, 1))
        if self.learnable_sc:
            self.c_sc = sn(nn.Conv2d(c_in, c_out, 1, 1, 0))
        self.activation = nn.ReLU(True)

    def forward(self, x):
        h = self.c2(self.activation(self.c1(self.activation(x))))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if not self.learnable_sc:
            return h + x
        sc = self.c_sc(x)
        return h + (F.avg_pool2d(sc, 2) if self.downsample else sc)


class GBlock(nn.Module):  # models/resblocks.py (layers registered in our order, for the weight copy)
    def __init__(self, c_in, c_out):
        super().__init__()
        self.b1, self.c1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.b2, self.c2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.c_sc = nn.Conv2d(c_in, c_out, 1, 1, 0)
        self.activation = nn.ReLU(True)

    def forward(self, x):
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
        h = self.c2(self.activation(self.b2(self.c1(up(self.activation(self.b1(x)))))))
        return h + self.c_sc(up(x))


def ref_resnet_trunk(resolution, nf):
    """The blocks of ResEBM32/ResEncoder32 (nf) and ResEBM128/ResEncoder128 (nf = 16 x base)."""
    if resolution == 32:
        return [DBlockOptimized(3, nf), DBlock(nf, nf, True), DBlock(nf, nf, False), DBlock(nf, nf, False)]
    return [DBlockOptimized(3, nf >> 4), DBlock(nf >> 4, nf >> 3, True), DBlock(nf >> 3, nf >> 2, True),
            DBlock(nf >> 2, nf >> 1, True), DBlock(nf >> 1, nf, True), DBlock(nf, nf, False)]


class ResEBM(nn.Module):  # models/res_ebm.py ResEBM32 / ResEBM128
    def __init__(self, resolution, nf):
        super().__init__()
        self.blocks = nn.Sequential(*ref_resnet_trunk(resolution, nf))
        self.l_out = sn(nn.Linear(nf, 1))

    def energy(self, v):
        return self.l_out(torch.sum(F.relu(self.blocks(v)), dim=(2, 3)))


class ResEncoder(nn.Module):  # models/res_inf_gen.py ResEncoder32 / ResEncoder128
    def __init__(self, resolution, nf, nz):
        super().__init__()
        self.blocks = nn.Sequential(*ref_resnet_trunk(resolution, nf))
        bias = resolution == 32  # ResEncoder128: bias=False
        self.mu_layer, self.var_layer = sn(nn.Linear(nf, nz, bias=bias)), sn(nn.Linear(nf, nz, bias=bias))

    def inference(self, v):
        out = torch.sum(F.relu(self.blocks(v)), dim=(2, 3))
        return self.mu_layer(out), -F.softplus(self.var_layer(out))


class ResDecoder(nn.Module):  # models/res_inf_gen.py ResDecoder32 / ResDecoder128
    def __init__(self, resolution, ndf, nz):
        super().__init__()
        widths = [ndf] * 4 if resolution == 32 else [ndf, ndf, ndf >> 1, ndf >> 2, ndf >> 3, ndf >> 4]
        self.ndf = ndf
        self.l1 = nn.Linear(nz, 16 * ndf)
        self.blocks = nn.Sequential(*[GBlock(a, b) for a, b in itertools.pairwise(widths)])
        self.b_out, self.c_out = nn.BatchNorm2d(widths[-1]), nn.Conv2d(widths[-1], 3, 3, 1, padding=1)

    def sample(self, h):
        out = self.blocks(self.l1(h).view(h.shape[0], -1, 4, 4))
        return torch.tanh(self.c_out(F.relu(self.b_out(out))))


class TriangleE(nn.Module):  # enijkamp/triangle train_cifar10.py _netE (energy_form identity)
    def __init__(self, nc, ndf):
        super().__init__()
        self.conv1 = nn.Conv2d(nc, ndf, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False)
        self.conv3 = nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False)
        self.conv4 = nn.Conv2d(ndf * 4, ndf * 4, 4, 2, 1, bias=False)
        self.conv5 = nn.Conv2d(ndf * 4, 1, 4, 1, 0)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.leaky_relu(conv(x), 0.2)
        return self.conv5(x).squeeze()


# ---------------------------------------------------------------- the authors' steps, transcribed


def reparemetrize(mu, log_var):  # utils.py
    return mu + torch.exp(log_var * 0.5) * torch.randn_like(log_var)


def kl_regularization(mu, log_var):  # utils.py
    return -0.5 * (log_var - mu**2 - torch.exp(log_var) + 1.0).squeeze().sum(dim=1)


def recorded_step(optimizer, params, grads):
    """optimizer.step(), recording the gradients it applies by our parameter names."""
    for name, p in params.items():
        if p.grad is not None:
            grads[name] = p.grad.detach().clone()
    optimizer.step()


def reference_dcgan_step(E, Q, P, v, h, names, *, lamb_vae):
    """train_cifar_BiDVL.py / train_celeba_BiDVL.py, one batch (offset, Lsteps = 1)."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(E.parameters(), lr=1e-4, weight_decay=0, betas=(0.0, 0.9))
    optQP = torch.optim.Adam([*Q.parameters(), *P.parameters()], lr=3e-4, weight_decay=1e-4, betas=(0.0, 0.9))
    grads, bs, h_dim = {}, v.shape[0], h.shape[1]
    h_hat = h.view(bs, h_dim, 1, 1)
    optE.zero_grad()
    v_hat = P(h_hat)
    lossUL = E.energy(v).mean() - E.energy(v_hat.detach()).mean()
    lossUL.backward()
    recorded_step(optE, names(E), grads)
    with torch.no_grad():
        E.energy(v)  # their importance ratio (computed, then unused): one more energy forward
    optQP.zero_grad()
    mu, log_var = Q(v)
    v_recon = P(reparemetrize(mu, log_var))
    v_hat = P(h_hat)
    energyP_ = E.energy(v_hat).mean()
    Q.requires_grad_(False), P.requires_grad_(False)
    mu_hat, _ = Q(v_hat)
    Q.requires_grad_(True), P.requires_grad_(True)
    loss_vae = mse(v_recon, v) / bs + kl_regularization(mu, log_var).mean()
    lossLL = energyP_ + mse(mu_hat, h_hat) / bs / h_dim
    (lossLL + loss_vae * lamb_vae).backward()
    recorded_step(optQP, {**names(Q), **names(P)}, grads)
    return grads


def reference_resnet_step(E, Q, P, v, h, names, *, lamb_vae=0.05):
    """train_cifar_resBiDVL32.py / train_celeba_resBiDVL128.py, one batch (n_dis = 1)."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(E.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))
    optQ = torch.optim.Adam(Q.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))
    optP = torch.optim.Adam(P.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))
    grads, (bs, h_dim) = {}, h.shape
    optE.zero_grad()
    v_hat = P.sample(h)
    lossUL = F.relu(1.0 + E.energy(v)).mean() + F.relu(1.0 - E.energy(v_hat.detach())).mean()
    lossUL.backward()
    recorded_step(optE, names(E), grads)
    optQ.zero_grad(), optP.zero_grad()
    mu, log_var = Q.inference(v)
    v_recon = P.sample(reparemetrize(mu, log_var))
    h_hat = torch.randn((bs, h_dim), dtype=v.dtype)  # a fresh draw for the lower level
    v_hat = P.sample(h_hat)
    energyP_ = E.energy(v_hat)
    Q.requires_grad_(False)
    mu_hat, _ = Q.inference(v_hat)
    Q.requires_grad_(True)
    lossLL = energyP_.mean() + (mse(v_recon, v) / bs + kl_regularization(mu, log_var).mean() * 1.0) * lamb_vae
    (lossLL + mse(mu_hat, h_hat) / bs * 0.0001).backward()
    recorded_step(optQ, names(Q), grads)
    recorded_step(optP, names(P), grads)
    return grads


def reference_triangle_step(netE, netI, netG, v, h, names):
    """enijkamp/triangle train_cifar10.py, one batch: E, then I, then G, each clipped at 100."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(netE.parameters(), lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0)
    optG = torch.optim.Adam(netG.parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=0.0005)
    optI = torch.optim.Adam(netI.parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=0.0)
    grads, batch_size = {}, v.shape[0]
    noise = h.view(batch_size, -1, 1, 1)

    def nll(z, z_mu, z_log_sigma):  # diag_normal_NLL
        return (0.5 * torch.sum(z_log_sigma.squeeze(), dim=1)
                + 0.5 * torch.sum((torch.mul(z - z_mu, z - z_mu) / (1e-6 + torch.exp(z_log_sigma))).squeeze(), dim=1))

    def reparametrize(mu, log_sigma):
        return torch.randn_like(mu).mul(torch.exp(log_sigma.mul(0.5))).add_(mu)

    def update(net, opt, loss):  # each net: backward, clip at 100, step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100)
        recorded_step(opt, names(net), grads)

    netE.zero_grad()
    E_T = torch.mean(netE(v))
    samples = netG(noise)
    errE = E_T - torch.mean(netE(samples.detach()))
    update(netE, optE, errE)

    netI.zero_grad()
    mu, log_sigma = netI(v)
    errRecon = mse(netG(reparametrize(mu, log_sigma)), v) / batch_size
    errKld = -0.5 * torch.mean(1 + log_sigma - mu.pow(2) - log_sigma.exp())
    mu_gen, log_sigma_gen = netI(samples.detach())
    errI = 1.0 * (errRecon + errKld) + 0.1 * torch.mean(nll(noise, mu_gen, log_sigma_gen))
    update(netI, optI, errI)

    netG.zero_grad()
    mu, log_sigma = netI(v)
    errRecon = mse(netG(reparametrize(mu, log_sigma)), v) / batch_size
    E_F = torch.mean(netE(samples))
    mu_gen, log_sigma_gen = netI(samples)
    errG = 1.0 * errRecon + E_F + 0.1 * torch.mean(nll(noise, mu_gen, log_sigma_gen))
    update(netG, optG, errG)
    return grads


# ---------------------------------------------------------------- the comparison


def spectral_norms(net):
    """(weight, set vectors, set iterations) of each spectrally normalised layer, ours or theirs."""
    for m in net.modules():
        if parametrize.is_parametrized(m, "weight"):
            p = m.parametrizations.weight[0]
            yield (m.parametrizations.weight.original, lambda u, v, p=p: (p._u.copy_(u), p._v.copy_(v)),
                   lambda k, p=p: setattr(p, "n_power_iterations", k))
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, SpectralNorm):
                yield (m.weight_orig, lambda u, v, m=m: (m.weight_u.copy_(u), m.weight_v.copy_(v)),
                       lambda k, hook=hook: setattr(hook, "n_power_iterations", k))


def converged_spectral_norms(net):
    with torch.no_grad():
        for weight, set_vectors, set_iterations in spectral_norms(net):
            u, _, vh = torch.linalg.svd(weight.flatten(1))
            set_vectors(u[:, 0], vh[0])
            set_iterations(POWER_ITERATIONS)


def copy_weights(ours, theirs):
    """Our initial parameters and BatchNorm statistics into their net (same order and shapes)."""
    ours_p, theirs_p = list(ours.parameters()), list(theirs.parameters())
    assert [p.shape for p in ours_p] == [p.shape for p in theirs_p]
    bn = lambda net: [b for m in net.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]
    with torch.no_grad():
        for a, b in [*zip(ours_p, theirs_p), *zip(bn(ours), bn(theirs), strict=True)]:
            b.copy_(a)
    converged_spectral_norms(ours)
    converged_spectral_norms(theirs)


def relative_error(ours, theirs, floor: float = 0.0) -> float:
    """max |ours - theirs| / max |theirs|, the scale at least `floor` (for gradients that are zero
    in exact arithmetic, like a conv bias followed by BatchNorm: their round-off is no signal)."""
    scale = max(theirs.double().abs().max().item(), floor)
    return (ours.double() - theirs.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def our_trainer(tmp_path, config, overrides):
    from bidvl.config import load_config
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs" / config, [
        f"run.dir={tmp_path / 'run'}", "data.auto_build=''", "data.num_workers=0", "train.mixed_precision=no",
        f"train.batch_size={BATCH}", *overrides])
    trainer = Trainer(cfg)
    for net in trainer.unwrapped.values():
        net.double()
    return trainer


def our_step(trainer, v, h, seed):
    """One train_step; the gradients each optimizer applies, by `net.parameter` name."""
    names = {id(p): f"{net}.{n}" for net, module in trainer.unwrapped.items() for n, p in module.named_parameters()}
    grads = {}
    for optimizer in (trainer.energy_opt, trainer.latent_opt):
        def step(*args, _inner=optimizer.step, _opt=optimizer, **kwargs):
            for group in _opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().clone()
            return _inner(*args, **kwargs)
        optimizer.step = step
    torch.manual_seed(seed)
    trainer.train_step([v], [h])
    return grads


def compare(tmp_path, config, overrides, make_reference, reference_step, seed=7):
    """Runs both steps from the same weights, data and noise; returns {tensor: relative error}."""
    torch.manual_seed(0)
    trainer = our_trainer(tmp_path, config, overrides)
    try:
        cfg = trainer.cfg
        refs = make_reference(cfg)
        for name, ref in zip(("energy", "encoder", "generator"), refs):
            ref.double().train()
            copy_weights(trainer.unwrapped[name], ref)
        ours_by_ref = {}
        for name, ref in zip(("energy", "encoder", "generator"), refs):
            for (n, _), p in zip(trainer.unwrapped[name].named_parameters(), ref.parameters()):
                ours_by_ref[id(p)] = f"{name}.{n}"
        names = lambda net: {ours_by_ref[id(p)]: p for p in net.parameters()}
        g = torch.Generator().manual_seed(1)
        res, c = cfg.data.resolution, cfg.data.channels
        v = (torch.rand(BATCH, c, res, res, generator=g, dtype=torch.float64) * 2 - 1)
        h = torch.randn(BATCH, cfg.model.latent_dim, generator=g, dtype=torch.float64)

        ours = our_step(trainer, v, h, seed)
        torch.manual_seed(seed)
        theirs = reference_step(*refs, v.clone(), h.clone(), names)
        assert set(ours) == set(theirs) and ours, sorted(set(ours) ^ set(theirs))
        # A gradient tensor's scale is at least 1e-6 of its net's largest gradient entry.
        net_scale = {net: max(g.abs().max().item() for k, g in theirs.items() if k.startswith(net + "."))
                     for net in {k.split(".")[0] for k in theirs}}
        errors = {f"grad {k}": relative_error(ours[k], theirs[k], 1e-6 * net_scale[k.split(".")[0]])
                  for k in theirs}
        for name, ref in zip(("energy", "encoder", "generator"), refs):
            mine = trainer.unwrapped[name]
            for (n, a), b in zip(mine.named_parameters(), ref.parameters()):
                errors[f"weight {name}.{n}"] = relative_error(a.detach(), b.detach())
            for (n, m), r in zip([(n, m) for n, m in mine.named_modules() if isinstance(m, nn.BatchNorm2d)],
                                 [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]):
                errors[f"running_mean {name}.{n}"] = relative_error(m.running_mean, r.running_mean)
                errors[f"running_var {name}.{n}"] = relative_error(m.running_var, r.running_var)
        return errors
    finally:
        trainer.close()


def assert_equivalent(errors):
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.3g} > {TOLERANCE:g}"
    assert len([k for k in errors if k.startswith("grad ")]) > 3


TINY = ["model.latent_dim=6", "model.energy_width=4", "model.encoder_width=4", "model.generator_width=4"]


def dcgan_reference(cfg):
    m, r = cfg.model, cfg.data.resolution
    return (RefConvE(3, r, m.energy_width), RefQ(3, r, m.latent_dim, m.encoder_width),
            RefP(3, r, m.latent_dim, m.generator_width))


def resnet_reference(cfg):
    m, r = cfg.model, cfg.data.resolution
    scale = 1 if r == 32 else 16  # ResEBM128(nf) has nf = 16 x our base width
    return (ResEBM(r, m.energy_width * scale), ResEncoder(r, m.encoder_width * scale, m.latent_dim),
            ResDecoder(r, m.generator_width * scale, m.latent_dim))


def triangle_reference(cfg):
    m = cfg.model
    return TriangleE(3, m.energy_width), RefQ(3, 32, m.latent_dim, m.encoder_width, batchnorm=False), \
        RefP(3, 32, m.latent_dim, m.generator_width)


@pytest.mark.parametrize("config,lamb_vae", [("cifar10.yaml", 0.05), ("celeba64.yaml", 1.0)],
                         ids=["dcgan32", "dcgan64"])
def test_equivalence_dcgan_step(tmp_path, config, lamb_vae):
    """DCGAN-32 (CIFAR-10) and DCGAN-64 (CelebA-64, r' = lamb_vae = 1.0) steps equal the authors'."""
    errors = compare(tmp_path, config, TINY, dcgan_reference,
                     lambda *a: reference_dcgan_step(*a, lamb_vae=lamb_vae))
    assert_equivalent(errors)


@pytest.mark.parametrize("config,widths", [("cifar10_resnet.yaml", 4), ("celeba128.yaml", 2)],
                         ids=["resnet32", "resnet128"])
def test_equivalence_resnet_step(tmp_path, config, widths):
    """ResNet-32 (CIFAR-10) and ResNet-128 (CelebA-128) steps equal the authors'."""
    overrides = ["model.latent_dim=6", *(f"model.{n}_width={widths}" for n in ("energy", "encoder", "generator"))]
    assert_equivalent(compare(tmp_path, config, overrides, resnet_reference, reference_resnet_step))


def test_equivalence_fails_with_the_old_resnet_latent_weight(tmp_path):
    """Mutation check: the latent term divided by h_dim (our former ResNet weight) is caught, and
    only the generator's gradients move (the encoder is frozen in the latent term)."""
    errors = compare(tmp_path, "cifar10_resnet.yaml", [*TINY, "objective.latent_reduction=mean"],
                     resnet_reference, reference_resnet_step)
    wrong = {k for k, e in errors.items() if e > TOLERANCE}
    assert any(k.startswith("grad generator.") for k in wrong)
    assert not any(k.startswith(("grad energy.", "grad encoder.")) for k in wrong)


def test_equivalence_divergence_triangle_step(tmp_path):
    """The Divergence triangle step (configs/cifar10_triangle.yaml) equals Han et al.'s."""
    assert_equivalent(compare(tmp_path, "cifar10_triangle.yaml", TINY, triangle_reference, reference_triangle_step))
