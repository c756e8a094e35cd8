"""The BiDVL objectives (Sec. 4.2.3 of the paper), as the authors' code computes them.

Pure functions of tensors and modules: nothing here knows about devices, processes or optimizers.
The engine decides which nets are trainable in which phase; these functions only decide which
*inputs* carry gradient (e.g. the latent term sees the encoder through detached parameters in the
`offset` variant, so only the generator learns from it).

Notation: v data in [-1,1]; h_p ~ p(h) = N(0, I); v_hat = G(h_p); q(h|v) = N(mu(v), exp(logvar(v))).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses are summed in (at least) float32, also under bf16/fp16 autocast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """h_q = mu + sigma * eps (Sec. 4.3)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def reconstruction_error(x_rec: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample summed squared error over pixels: sum (G(h_q) - v)^2; shape (B,)."""
    return (at_least_float32(x_rec) - at_least_float32(v)).pow(2).flatten(1).sum(1)


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, sigma^2) || N(0, I)) summed over latent dims; shape (B,)."""
    mu, logvar = at_least_float32(mu), at_least_float32(logvar)
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def importance_ratio(energy_data: torch.Tensor, r_basic: float, bias: str) -> torch.Tensor:
    """r(v) = r' x bias(v) (Sec. 5.4). bias `none`: 1; `sigmoid`: Sigmoid(mean E - E(v)).

    `energy_data` must come from the (frozen) energy net without gradient; shape (B,).
    """
    if bias == "none":
        return torch.full_like(energy_data, r_basic, dtype=torch.float32)
    if bias == "sigmoid":
        e = at_least_float32(energy_data.detach())
        return r_basic * torch.sigmoid(e.mean() - e)
    raise ValueError(f"objective.ratio_bias={bias!r}: expected none or sigmoid")


def weighted_vae_term(recon: torch.Tensor, kl: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """D_r(v)(q(v) q(h|v) || p(v,h)) of Eq. (13): importance-weighted reconstruction + KL, batch mean."""
    return (ratio * (recon + kl)).mean()


def energy_term(energy_samples: torch.Tensor) -> torch.Tensor:
    """E_{p(v,h)}[E(v)] of Eq. (13): mean energy of generated samples (gradient reaches G via E)."""
    return at_least_float32(energy_samples).mean()


def latent_term(mu_of_samples: torch.Tensor, h_p: torch.Tensor) -> torch.Tensor:
    """D_KL(p(v,h) || q(h|v)) of Eq. (13), as the authors run it: sum (mu(v_hat) - h_p)^2 / bs / h_dim."""
    bs, h_dim = h_p.shape
    return (at_least_float32(mu_of_samples) - at_least_float32(h_p)).pow(2).sum() / bs / h_dim


def upper_level_loss(energy_data: torch.Tensor, energy_samples: torch.Tensor, form: str) -> torch.Tensor:
    """Eq. (14): `difference` mean E(v) - mean E(v_hat) (DCGAN code) or `hinge`
    mean relu(1 + E(v)) + mean relu(1 - E(v_hat)) (the authors' ResNet code)."""
    energy_data, energy_samples = at_least_float32(energy_data), at_least_float32(energy_samples)
    if form == "difference":
        return energy_data.mean() - energy_samples.mean()
    if form == "hinge":
        return F.relu(1.0 + energy_data).mean() + F.relu(1.0 - energy_samples).mean()
    raise ValueError(f"objective.upper_loss={form!r}: expected difference or hinge")


def upper_level_encoder_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """`not_offset` only (Sec. 4.4): the encoder minimises KL(q(h|v_hat) || p(h)) in the upper level.

    Normalised like the latent term it stands against (sum / bs / h_dim), so w_latent weighs both.
    """
    bs, h_dim = mu.shape
    return kl_to_prior(mu, logvar).sum() / bs / h_dim


def frozen_call(module: nn.Module, *args):
    """Calls `module` with its parameters detached: gradients reach the inputs, never the parameters.

    Buffers (BatchNorm statistics, spectral-norm vectors) are the module's own, updated as in a
    normal forward.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args, strict=False)


class LowerLevelTerms(NamedTuple):
    loss: torch.Tensor
    weighted_vae: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    energy: torch.Tensor
    latent: torch.Tensor
    ratio: torch.Tensor


def lower_level_loss(v, h_p, *, energy_net, encoder, generator, encoder_for_latent,
                     latent_mode: str, w_latent: float, r_basic: float, ratio_bias: str,
                     energy_data=None) -> LowerLevelTerms:
    """loss_LL of Eq. (13) (`offset`) or Eq. (11) (`not_offset`); `none` drops the latent term.

    energy_net: frozen (its parameters must not require grad); encoder, generator: trained.
    encoder_for_latent: how the latent term calls the encoder — `frozen_call`-wrapped in `offset`
    (only G learns from it), the trainable encoder in `not_offset`.
    energy_data: E(v) without gradient, needed only for the sigmoid ratio bias.
    """
    mu, logvar = encoder(v)
    recon = reconstruction_error(generator(reparameterize(mu, logvar)), v)
    kl = kl_to_prior(mu, logvar)
    if ratio_bias == "sigmoid" and energy_data is None:
        raise ValueError("the sigmoid ratio bias needs energy_data = E(v)")
    ratio = importance_ratio(
        energy_data if energy_data is not None else recon.detach(), r_basic, ratio_bias
    )
    weighted_vae = weighted_vae_term(recon, kl, ratio)

    v_hat = generator(h_p)
    e_term = energy_term(energy_net(v_hat))
    if latent_mode == "none":
        lat = torch.zeros((), device=v.device)
    elif latent_mode in ("offset", "not_offset"):
        lat = latent_term(encoder_for_latent(v_hat)[0], h_p)
    else:
        raise ValueError(f"objective.latent_term={latent_mode!r}: expected offset, not_offset or none")
    loss = e_term + w_latent * lat + weighted_vae
    return LowerLevelTerms(loss, weighted_vae, recon.mean(), kl.mean(), e_term, lat, ratio.mean())


# ---------------------------------------------------------------- baselines (objective.name)


def gaussian_nll(h: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample -log N(h; mu, exp(logvar)) summed over latent dims; shape (B,)."""
    h, mu, logvar = at_least_float32(h), at_least_float32(mu), at_least_float32(logvar)
    return 0.5 * ((h - mu).pow(2) * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(1)


def vae_loss(v, *, encoder, generator) -> LowerLevelTerms:
    """`vae` baseline: the negative ELBO, summed-pixel squared error + Gaussian KL, batch mean.

    Same reconstruction and KL terms as BiDVL's (`reconstruction_error`, `kl_to_prior`) with weight
    1 instead of r'. No energy net, no latent term (reported as 0, ratio as 1).
    """
    mu, logvar = encoder(v)
    recon = reconstruction_error(generator(reparameterize(mu, logvar)), v)
    kl = kl_to_prior(mu, logvar)
    loss = (recon + kl).mean()
    zero = torch.zeros((), device=v.device)
    return LowerLevelTerms(loss, loss, recon.mean(), kl.mean(), zero, zero, torch.ones((), device=v.device))


def divergence_triangle_loss(v, h_p, *, energy_net, encoder, generator, w_latent: float) -> LowerLevelTerms:
    """`divergence_triangle` baseline (Han et al., CVPR 2019), encoder + generator part.

    One joint loss  recon(v) + KL(q(h|v) || p(h)) + E(G(h_p)) + w_latent * NLL(h_p | q(h|G(h_p)))
    whose gradients split exactly as the paper's separate losses: the encoder gets
    recon + KL + w_latent * NLL (E(G(h_p)) does not depend on it), the generator gets
    recon + E(G(h_p)) + w_latent * NLL (the KL does not depend on it). Han et al. use w_latent = 0.1.
    energy_net must be frozen (`frozen_call`); its own loss is `upper_level_loss(..., "difference")`.
    Terms reported: weighted_vae = recon + KL (batch means), latent = the NLL, ratio = 1.
    """
    mu, logvar = encoder(v)
    recon = reconstruction_error(generator(reparameterize(mu, logvar)), v)
    kl = kl_to_prior(mu, logvar)
    v_hat = generator(h_p)
    e_term = energy_term(energy_net(v_hat))
    mu_hat, logvar_hat = encoder(v_hat)
    nll = gaussian_nll(h_p, mu_hat, logvar_hat).mean()
    vae = (recon + kl).mean()
    loss = vae + e_term + w_latent * nll
    return LowerLevelTerms(loss, vae, recon.mean(), kl.mean(), e_term, nll, torch.ones((), device=v.device))


# ---------------------------------------------------------------- objectives as objects


class UpperLevelTerms(NamedTuple):
    loss: torch.Tensor
    energy_data: torch.Tensor  # E(v), shape (B,)
    energy_samples: torch.Tensor  # E(v_hat), shape (B,)


class Objective:
    """One `objective.name`: which nets each level trains and the losses it computes.

    The engine runs, per batch, `upper_level` (if `has_upper_level`) training the nets named in
    `upper_level_trains`, and `lower_level` training encoder + generator with the energy net
    frozen. Trained nets are passed as they are; frozen ones through `frozen_call`.
    """

    name = ""
    has_upper_level = True
    upper_level_trains: tuple[str, ...] = ("energy",)

    def __init__(self, cfg):
        self.cfg = cfg  # bidvl.config.ObjectiveConfig

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        """Eq. (14): E runs once on cat(v, v_hat); v_hat carries no gradient."""
        energies = energy_net(torch.cat([v, v_hat.to(v.dtype)]))
        e_data, e_samples = energies[: len(v)], energies[len(v):]
        return UpperLevelTerms(upper_level_loss(e_data, e_samples, self.cfg.upper_loss), e_data, e_samples)

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder) -> LowerLevelTerms:
        raise NotImplementedError


class BiDVL(Objective):
    """The paper's objective: Eq. (13)/(11) in the lower level, Eq. (14) in the upper level (plus,
    in `not_offset`, the encoder's KL(q(h|v_hat) || p(h)) of Sec. 4.4)."""

    name = "bidvl"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.latent_term == "not_offset":
            self.upper_level_trains = ("energy", "encoder")

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        terms = super().upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
        if self.cfg.latent_term != "not_offset":
            return terms
        mu, logvar = encoder(v_hat)
        return terms._replace(loss=terms.loss + self.cfg.w_latent * upper_level_encoder_kl(mu, logvar))

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder) -> LowerLevelTerms:
        o = self.cfg
        energy_data = None
        if o.ratio_bias == "sigmoid":
            with torch.no_grad():
                energy_data = energy_net(v)
        return lower_level_loss(
            v, h_p, energy_net=energy_net, encoder=encoder, generator=generator,
            encoder_for_latent=encoder if o.latent_term == "not_offset" else frozen_encoder,
            latent_mode=o.latent_term, w_latent=o.w_latent, r_basic=o.r_basic,
            ratio_bias=o.ratio_bias, energy_data=energy_data,
        )


class VAE(Objective):
    """Baseline: the negative ELBO; no upper level (the energy net is never trained)."""

    name = "vae"
    has_upper_level = False
    upper_level_trains = ()

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        raise RuntimeError("the vae objective has no upper level")

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder) -> LowerLevelTerms:
        return vae_loss(v, encoder=encoder, generator=generator)


class DivergenceTriangle(Objective):
    """Baseline (Han et al., CVPR 2019): Eq. (14)'s upper level, `divergence_triangle_loss` below."""

    name = "divergence_triangle"

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder) -> LowerLevelTerms:
        return divergence_triangle_loss(v, h_p, energy_net=energy_net, encoder=encoder,
                                        generator=generator, w_latent=self.cfg.w_latent)


OBJECTIVES = {o.name: o for o in (BiDVL, VAE, DivergenceTriangle)}


def build(cfg) -> Objective:
    """The objective object of `cfg.objective` (a Config or its ObjectiveConfig)."""
    o = getattr(cfg, "objective", cfg)
    if o.name not in OBJECTIVES:
        raise ValueError(f"objective.name={o.name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[o.name](o)


class NegativeElbo(nn.Module):
    """The VAE's stand-in for an energy: -ELBO(v) at the posterior mean, recon(G(mu(v)), v) + KL.

    Deterministic (h = mu(v), no sampling), so OOD scores are reproducible; lower = more
    in-distribution, like E(v). Used by the evaluation when objective.name = vae.
    """

    def __init__(self, encoder: nn.Module, generator: nn.Module):
        super().__init__()
        self.encoder, self.generator = encoder, generator

    def forward(self, v):
        mu, logvar = self.encoder(v)
        return reconstruction_error(self.generator(mu), v) + kl_to_prior(mu, logvar)
