"""Our engine's step against the authors' code, step by step (`pytest -k equivalence`).

For each workload, ITERATIONS full iterations of `Trainer.train_step` (the objective object, the
optimizers and the phases exactly as a run uses them, built from the shipped config with tiny
widths, the learning rates set by `Trainer.set_learning_rates` as `fit` does) are compared with a
*reference transcription* of the authors' training loop written below in plain PyTorch: their nets
(`models/ebm.py`, `models/inf_gen.py`, `models/res_ebm.py`, `models/res_inf_gen.py`,
`models/resblocks.py` of gekanFAE/BiDVL; `_netE`, `_netI`, `_netG` of enijkamp/triangle
`train_cifar10.py`) with their `nn.utils.spectral_norm` hook, their losses, their optimizers and
ExponentialLR schedulers with the hyperparameters of their scripts, written out here, not read from
our config. Nothing from the project is used on the reference side; only our nets' initial weights
are copied in. Float64, identical weights, data and noise (both sides draw the reparameterisation
and lower-level noise from torch's global generator in the same order, seeded the same).

Two iterations, one batch an epoch: Adam's first step is lr x g / (|g| + eps) whatever the betas,
and the learning rates decay only at an epoch boundary, so the second iteration is the first that
sees the betas and `lr_decay` (a wrong one fails it; a single iteration does not).
At every iteration, every gradient that reaches an optimizer, every update an optimizer applies
and every weight must agree to 1e-6 relative (max |ours - theirs| / max |theirs| per tensor; for a
gradient, max |theirs| is taken at least 1e-6 of its net's largest gradient entry, since some are
zero in exact arithmetic, e.g. the bias of a conv followed by BatchNorm; such a tensor's update,
round-off / Adam's eps, is not compared); BatchNorm running statistics too.

Spectral norm: theirs is the old hook (one power iteration per forward: four energy forwards per
DCGAN step, three per ResNet step), ours the parametrization (one iteration per forward, the upper
level on cat(v, v_hat)); the iterations also run in another order (u first vs v first). What the
two estimate is the same largest singular value; to compare the maths of the step rather than the
convergence state of the estimators, both are set to the exact singular vectors of every weight at
the start of every iteration and run POWER_ITERATIONS per forward. (Between iterations the vectors
alone would not stay converged: some of these tiny weights have nearly equal top singular values,
and a weight's gradient is first order in its vectors' error.) What one iteration per forward
changes is measured separately (docs/fidelity.md).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple

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
ITERATIONS = 2  # the second Adam step sees the betas (the first: lr x sign(g)), and the decayed LR
NETS = ("energy", "encoder", "generator")

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


class Reference(NamedTuple):
    """One of the authors' training loops: their optimizers, built once; `step(v, h, names)` runs
    the loop body on one batch and returns the gradients each optimizer applied (by our names);
    `schedulers` (their ExponentialLR) are stepped at every epoch boundary."""

    step: Callable
    schedulers: list


def exponential_lr(gamma, *optimizers):
    return [torch.optim.lr_scheduler.ExponentialLR(opt, gamma) for opt in optimizers]


def reference_dcgan(E, Q, P, *, lamb_vae):
    """train_cifar_BiDVL.py / train_celeba_BiDVL.py (offset, Lsteps = 1): Adam (L196-197) and
    ExponentialLR(0.998) per epoch (Egamma, QPgamma: L64-75)."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(E.parameters(), lr=1e-4, weight_decay=0, betas=(0.0, 0.9))
    optQP = torch.optim.Adam([*Q.parameters(), *P.parameters()], lr=3e-4, weight_decay=1e-4, betas=(0.0, 0.9))

    def step(v, h, names):
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

    return Reference(step, exponential_lr(0.998, optQP, optE))


def reference_resnet(E, Q, P, *, gamma, lamb_vae=0.05):
    """train_cifar_resBiDVL32.py / train_celeba_resBiDVL128.py (n_dis = 1): Adam, ExponentialLR
    per epoch (Egamma, Pgamma: 0.999 at 32 px, 0.998 at 128 px)."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(E.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))
    optQ = torch.optim.Adam(Q.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))
    optP = torch.optim.Adam(P.parameters(), lr=2e-4, weight_decay=0, betas=(0.0, 0.9))

    def step(v, h, names):
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

    return Reference(step, exponential_lr(gamma, optE, optQ, optP))


def reference_triangle(netE, netI, netG):
    """enijkamp/triangle train_cifar10.py: E, then I, then G, each clipped at 100; Adam (L46-64)
    and ExponentialLR(0.998) (L66-68). Their schedulers also step once before the first epoch
    (L286-288), so their first epoch runs at lr x 0.998: a known difference (docs/fidelity.md),
    left out here as in ours."""
    mse = nn.MSELoss(reduction="sum")
    optE = torch.optim.Adam(netE.parameters(), lr=1e-4, betas=(0.5, 0.999), weight_decay=0.0)
    optG = torch.optim.Adam(netG.parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=0.0005)
    optI = torch.optim.Adam(netI.parameters(), lr=3e-4, betas=(0.5, 0.999), weight_decay=0.0)

    def nll(z, z_mu, z_log_sigma):  # diag_normal_NLL
        return (0.5 * torch.sum(z_log_sigma.squeeze(), dim=1)
                + 0.5 * torch.sum((torch.mul(z - z_mu, z - z_mu) / (1e-6 + torch.exp(z_log_sigma))).squeeze(), dim=1))

    def reparametrize(mu, log_sigma):
        return torch.randn_like(mu).mul(torch.exp(log_sigma.mul(0.5))).add_(mu)

    def step(v, h, names):
        grads, batch_size = {}, v.shape[0]
        noise = h.view(batch_size, -1, 1, 1)

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

    return Reference(step, exponential_lr(0.998, optE, optG, optI))


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


def recording(trainer):
    """`step(v, h)`: one train_step, returning the gradients each optimizer applied, by
    `net.parameter` name (the optimizers' `step` is wrapped to record them)."""
    names = {id(p): f"{net}.{n}" for net, module in trainer.unwrapped.items() for n, p in module.named_parameters()}
    grads = {}
    for optimizer in (trainer.energy_opt, trainer.latent_opt):
        def optimizer_step(*args, _inner=optimizer.step, _opt=optimizer, **kwargs):
            for group in _opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().clone()
            return _inner(*args, **kwargs)
        optimizer.step = optimizer_step

    def step(v, h):
        grads.clear()
        trainer.train_step([v], [h])
        return dict(grads)

    return step


def net_scales(tensors) -> dict:
    """{net: largest |entry|} over tensors keyed `net.parameter`."""
    nets = {k.split(".")[0] for k in tensors}
    return {net: max(t.abs().max().item() for k, t in tensors.items() if k.startswith(net + ".")) for net in nets}


def compare(tmp_path, config, overrides, make_nets, make_loop, seed=7, iterations=ITERATIONS):
    """Runs `iterations` iterations of ours and of their loop (`make_loop(*their nets)`, a
    `Reference`) from the same weights, data and noise, one batch an epoch (so the learning rates
    decay between iterations); returns {"step i <what> <tensor>": relative error}."""
    torch.manual_seed(0)
    trainer = our_trainer(tmp_path, config, overrides)
    try:
        cfg = trainer.cfg
        refs = make_nets(cfg)
        for name, ref in zip(NETS, refs):
            ref.double().train()
            copy_weights(trainer.unwrapped[name], ref)
        ours_by_ref = {}
        for name, ref in zip(NETS, refs):
            for (n, _), p in zip(trainer.unwrapped[name].named_parameters(), ref.parameters()):
                ours_by_ref[id(p)] = f"{name}.{n}"
        names = lambda net: {ours_by_ref[id(p)]: p for p in net.parameters()}
        mine = lambda: {f"{name}.{n}": p.detach().clone() for name in NETS
                        for n, p in trainer.unwrapped[name].named_parameters()}
        theirs_now = lambda: {k: p.detach().clone() for ref in refs for k, p in names(ref).items()}
        our_step, reference = recording(trainer), make_loop(*refs)
        g = torch.Generator().manual_seed(1)
        res, c = cfg.data.resolution, cfg.data.channels
        trainer.steps_per_epoch = 1  # as fit() sets it from the data: here one batch an epoch
        trainer.set_learning_rates()
        errors, moved = {}, set()
        for i in range(1, iterations + 1):
            v = torch.rand(BATCH, c, res, res, generator=g, dtype=torch.float64) * 2 - 1
            h = torch.randn(BATCH, cfg.model.latent_dim, generator=g, dtype=torch.float64)
            for net in [*trainer.unwrapped.values(), *refs]:  # the exact sigma (see the top)
                converged_spectral_norms(net)
            ours_before, before = mine(), theirs_now()
            torch.manual_seed(seed + i)
            ours = our_step(v, h)
            trainer.state.step += 1  # as fit(): at an epoch boundary the LRs are set for the next epoch
            if trainer.state.step % trainer.steps_per_epoch == 0:
                trainer.set_learning_rates()
            torch.manual_seed(seed + i)
            theirs = reference.step(v.clone(), h.clone(), names)
            for scheduler in reference.schedulers:  # their epoch boundary
                scheduler.step()
            assert set(ours) == set(theirs) and ours, sorted(set(ours) ^ set(theirs))
            # A gradient tensor's scale is at least 1e-6 of its net's largest gradient entry;
            # `moved`: the tensors with a gradient above that so far.
            floor = {net: 1e-6 * s for net, s in net_scales(theirs).items()}
            errors |= {f"step {i} grad {k}": relative_error(ours[k], theirs[k], floor[k.split(".")[0]])
                       for k in theirs}
            moved |= {k for k in theirs if theirs[k].abs().max() > floor[k.split(".")[0]]}
            # The update each optimizer applied: lr x Adam's direction, where the betas and the
            # decayed LR show. Not for a tensor whose gradient has been zero in exact arithmetic
            # (not `moved`): Adam moves it by round-off / eps, no signal.
            ours_after, theirs_after = mine(), theirs_now()
            errors |= {f"step {i} update {k}": relative_error(ours_after[k] - ours_before[k],
                                                               theirs_after[k] - before[k]) for k in moved}
            errors |= {f"step {i} weight {k}": relative_error(ours_after[k], theirs_after[k]) for k in before}
            for name, ref in zip(NETS, refs):
                for (n, m), r in zip([(n, m) for n, m in trainer.unwrapped[name].named_modules()
                                      if isinstance(m, nn.BatchNorm2d)],
                                     [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]):
                    errors[f"step {i} running_mean {name}.{n}"] = relative_error(m.running_mean, r.running_mean)
                    errors[f"step {i} running_var {name}.{n}"] = relative_error(m.running_var, r.running_var)
        return errors
    finally:
        trainer.close()


def assert_equivalent(errors):
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.3g} > {TOLERANCE:g}"
    for i in range(1, ITERATIONS + 1):
        assert len([k for k in errors if k.startswith(f"step {i} grad ")]) > 3


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
    errors = compare(tmp_path, config, TINY, dcgan_reference, lambda *nets: reference_dcgan(*nets, lamb_vae=lamb_vae))
    assert_equivalent(errors)


# At 128 px the reconstruction sum (49152 pixels, x r') dominates the generator's gradient: with 6
# latent dims the latent term (x 1e-4, summed over dims) was 5e-8 of it, so a 10x error in its
# weight went unseen. The config's 128 latent dims make it visible (the mutation check below).
RESNET128 = [f"model.{n}_width=2" for n in NETS]


@pytest.mark.parametrize("config,overrides,gamma", [("cifar10_resnet.yaml", TINY, 0.999),
                                                    ("celeba128.yaml", RESNET128, 0.998)],
                         ids=["resnet32", "resnet128"])
def test_equivalence_resnet_step(tmp_path, config, overrides, gamma):
    """ResNet-32 (CIFAR-10) and ResNet-128 (CelebA-128) steps equal the authors'."""
    assert_equivalent(compare(tmp_path, config, overrides, resnet_reference,
                              lambda *nets: reference_resnet(*nets, gamma=gamma)))


@pytest.mark.parametrize("config,overrides,gamma,mutation", [
    ("cifar10_resnet.yaml", TINY, 0.999, "objective.latent_reduction=mean"),  # our former weight: / h_dim
    ("celeba128.yaml", RESNET128, 0.998, "objective.w_latent=1.0e-3"),  # 10 x theirs
], ids=["resnet32-over-h_dim", "resnet128-tenfold"])
def test_equivalence_fails_with_a_wrong_resnet_latent_weight(tmp_path, config, overrides, gamma, mutation):
    """Mutation check: a wrong latent-term weight is caught in the first step, and only the
    generator's gradients move (the encoder is frozen in the latent term)."""
    errors = compare(tmp_path, config, [*overrides, mutation], resnet_reference,
                     lambda *nets: reference_resnet(*nets, gamma=gamma), iterations=1)
    wrong = {k for k, e in errors.items() if e > TOLERANCE}
    assert any(k.startswith("step 1 grad generator.") for k in wrong)
    assert not any(k.startswith(("step 1 grad energy.", "step 1 grad encoder.")) for k in wrong)


def test_equivalence_divergence_triangle_step(tmp_path):
    """The Divergence triangle step (configs/cifar10_triangle.yaml) equals Han et al.'s."""
    assert_equivalent(compare(tmp_path, "cifar10_triangle.yaml", TINY, triangle_reference, reference_triangle))


@pytest.mark.parametrize("energy_dtype,loss_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                     (torch.float32, torch.float32), (torch.float64, torch.float64)],
                         ids=["bf16", "fp16", "fp32", "fp64"])
def test_r_prime_is_in_the_loss_dtype(energy_dtype, loss_dtype):
    """r' (objective.r_basic) weighs recon + KL in their dtype (at least float32): not rounded to
    bf16/fp16 under autocast (0.05 would become 0.0500488), nor to float32 in a float64 run
    (0.05 + 7e-10: the equivalence tests' former largest difference, 1.5e-8, under their tolerance)."""
    from bidvl import objectives

    energies = torch.tensor([0.5, -1.0, 2.0], dtype=energy_dtype)
    ratio = objectives.importance_ratio(energies, 0.05, "none")
    assert ratio.dtype == loss_dtype and ratio.tolist() == [torch.tensor(0.05, dtype=loss_dtype).item()] * 3
    sigmoid = objectives.importance_ratio(energies, 0.05, "sigmoid")
    e = energies.to(loss_dtype)
    assert sigmoid.dtype == loss_dtype and torch.equal(sigmoid, 0.05 * torch.sigmoid(e.mean() - e))
