"""The BiDVL objectives (Sec. 4.2.3 of the paper), as the authors' code computes them.

Pure functions of tensors and modules: nothing here knows about devices, processes or optimizers.
The engine decides which nets are trainable in which phase; these functions only decide which
*inputs* carry gradient (e.g. the latent term sees the encoder through detached parameters in the
`offset` variant, so only the generator learns from it).

Notation: v data in [-1,1]; h_p ~ p(h) = N(0, I); v_hat = G(h_p); q(h|v) = N(mu(v), exp(logvar(v))).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

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

    `energy_data` must come from the (frozen) energy net without gradient; shape (B,). The ratio
    is in the losses' dtype (`at_least_float32` of it): r' is not rounded to bf16/fp16 under
    autocast, nor to float32 when the losses are float64.
    """
    if bias == "none":
        return torch.full_like(at_least_float32(energy_data), r_basic)
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


LATENT_REDUCTIONS = ("mean", "sum_over_dims")


def latent_term(mu_of_samples: torch.Tensor, h_p: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """D_KL(p(v,h) || q(h|v)) of Eq. (13), as the authors run it: sum (mu(v_hat) - h_p)^2 / bs / h_dim
    (`mean`, their DCGAN scripts) or sum (mu(v_hat) - h_p)^2 / bs (`sum_over_dims`, their ResNet
    scripts, which weigh it by 1e-4)."""
    return _latent_reduce((at_least_float32(mu_of_samples) - at_least_float32(h_p)).pow(2), reduction)


def _latent_reduce(per_dim: torch.Tensor, reduction: str) -> torch.Tensor:
    """(B, h_dim) -> sum / bs / h_dim (`mean`) or sum / bs (`sum_over_dims`)."""
    bs, h_dim = per_dim.shape
    if reduction == "mean":
        return per_dim.sum() / bs / h_dim
    if reduction == "sum_over_dims":
        return per_dim.sum() / bs
    raise ValueError(f"objective.latent_reduction={reduction!r}: expected one of {', '.join(LATENT_REDUCTIONS)}")


def upper_level_loss(energy_data: torch.Tensor, energy_samples: torch.Tensor, form: str) -> torch.Tensor:
    """Eq. (14): `difference` mean E(v) - mean E(v_hat) (DCGAN code) or `hinge`
    mean relu(1 + E(v)) + mean relu(1 - E(v_hat)) (the authors' ResNet code)."""
    energy_data, energy_samples = at_least_float32(energy_data), at_least_float32(energy_samples)
    if form == "difference":
        return energy_data.mean() - energy_samples.mean()
    if form == "hinge":
        return F.relu(1.0 + energy_data).mean() + F.relu(1.0 - energy_samples).mean()
    raise ValueError(f"objective.upper_loss={form!r}: expected difference or hinge")


def noise_negatives_term(energy_data: torch.Tensor, energy_noise: torch.Tensor, form: str) -> torch.Tensor:
    """Opt-in stabiliser, not in the paper (objective.noise_negatives > 0): uniform noise images
    as extra negatives of the upper level, Eq. (14)'s loss with noise in place of v_hat. The
    paper's objective is unchanged; this term pushes the energy of noise above the data's, the
    failure health checks see as `the energy ranks uniform noise above data` (docs/health.md)."""
    return upper_level_loss(energy_data, energy_noise, form)


def upper_level_encoder_kl(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """`not_offset` only (Sec. 4.4): the encoder minimises KL(q(h|v_hat) || p(h)) in the upper level.

    Normalised like the latent term it stands against (`reduction`), so w_latent weighs both.
    """
    bs, h_dim = mu.shape
    total = kl_to_prior(mu, logvar).sum()
    if reduction == "mean":
        return total / bs / h_dim
    if reduction == "sum_over_dims":
        return total / bs
    raise ValueError(f"objective.latent_reduction={reduction!r}: expected one of {', '.join(LATENT_REDUCTIONS)}")


def frozen_call(module: nn.Module, *args):
    """Calls `module` with its parameters detached: gradients reach the inputs, never the parameters.

    Buffers (BatchNorm statistics, spectral-norm vectors) are the module's own, updated as in a
    normal forward.
    """
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args, strict=False)


class Frozen(nn.Module):
    """`module` called through `frozen_call`; a module itself, so `running_stats_untouched` can
    still reach its BatchNorm layers."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return frozen_call(self.module, *args)


@contextlib.contextmanager
def running_stats_untouched(module: nn.Module):
    """Inside, BatchNorm layers of `module` in training mode normalise with the batch statistics as
    usual but leave their running statistics and counters unchanged: for a forward that repeats
    one the authors' code ran once and reused (so the running statistics see each batch as often
    as theirs)."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # training + no tracking: batch statistics, no update
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class LowerLevelTerms(NamedTuple):
    """A lower-level (phase's) loss and its terms, batch means; None: a term the loss has not."""

    loss: torch.Tensor
    weighted_vae: Optional[torch.Tensor]
    recon: Optional[torch.Tensor]
    kl: Optional[torch.Tensor]
    energy: Optional[torch.Tensor]
    latent: Optional[torch.Tensor]
    ratio: Optional[torch.Tensor]


def lower_level_loss(v, h_p, *, energy_net, encoder, generator, encoder_for_latent,
                     latent_mode: str, w_latent: float, r_basic: float, ratio_bias: str,
                     energy_data=None, latent_reduction: str = "mean",
                     fresh_latents: bool = False) -> LowerLevelTerms:
    """loss_LL of Eq. (13) (`offset`) or Eq. (11) (`not_offset`); `none` drops the latent term.

    energy_net: frozen (its parameters must not require grad); encoder, generator: trained.
    encoder_for_latent: how the latent term calls the encoder — `frozen_call`-wrapped in `offset`
    (only G learns from it), the trainable encoder in `not_offset`.
    energy_data: E(v) without gradient, needed only for the sigmoid ratio bias.
    latent_reduction: see `latent_term`. fresh_latents: draw a new h_p ~ N(0, I) like `h_p` (the
    authors' ResNet scripts) after the reparameterisation noise, as they do; else use `h_p`.
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

    if fresh_latents:
        h_p = torch.randn_like(h_p)
    v_hat = generator(h_p)
    e_term = energy_term(energy_net(v_hat))
    if latent_mode == "none":
        lat = torch.zeros((), device=v.device)
    elif latent_mode in ("offset", "not_offset"):
        lat = latent_term(encoder_for_latent(v_hat)[0], h_p, latent_reduction)
    else:
        raise ValueError(f"objective.latent_term={latent_mode!r}: expected offset, not_offset or none")
    loss = e_term + w_latent * lat + weighted_vae
    return LowerLevelTerms(loss, weighted_vae, recon.mean(), kl.mean(), e_term, lat, ratio.mean())


# ---------------------------------------------------------------- baselines (objective.name)


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


def triangle_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The Divergence triangle's KL(q(h|v) || p(h)) as Han et al. compute it (`errKld` in
    enijkamp/triangle `train_cifar10.py`): -0.5 x the mean over batch *and latent dims* of
    1 + logvar - mu^2 - exp(logvar), i.e. `kl_to_prior` / h_dim, batch mean."""
    mu, logvar = at_least_float32(mu), at_least_float32(logvar)
    return -0.5 * torch.mean(1.0 + logvar - mu.pow(2) - logvar.exp())


def triangle_latent_nll(h: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log q(h | v) as Han et al.'s `diag_normal_NLL`, batch mean: 0.5 sum logvar + 0.5 sum
    (h - mu)^2 / (1e-6 + exp(logvar)) over latent dims (no log 2 pi; the 1e-6 is theirs)."""
    h, mu, logvar = at_least_float32(h), at_least_float32(mu), at_least_float32(logvar)
    nll = 0.5 * logvar.sum(1) + 0.5 * ((h - mu).pow(2) / (1e-6 + logvar.exp())).sum(1)
    return nll.mean()


def triangle_encoder_loss(v, h_p, *, encoder, generator, w_latent: float) -> LowerLevelTerms:
    """The Divergence triangle's encoder loss (`errI`): recon(v) + KL + w_latent x NLL(h_p | G(h_p)).

    generator frozen (Han et al. discard its gradient from this loss); G(h_p) without gradient and
    without touching G's running statistics (they reuse the upper level's samples). Han et al.:
    w_latent = 0.1. Reported: weighted_vae = recon + KL, latent = the NLL.
    """
    mu, logvar = encoder(v)
    recon = reconstruction_error(generator(reparameterize(mu, logvar)), v).mean()
    kl = triangle_kl(mu, logvar)
    with torch.no_grad(), running_stats_untouched(generator):
        v_hat = generator(h_p)
    nll = triangle_latent_nll(h_p, *encoder(v_hat))
    loss = recon + kl + w_latent * nll
    return LowerLevelTerms(loss, recon + kl, recon, kl, None, nll, None)


def triangle_generator_loss(v, h_p, *, energy_net, encoder, generator, w_latent: float) -> LowerLevelTerms:
    """The Divergence triangle's generator loss (`errG`): recon(v) + E(G(h_p)) + w_latent x NLL.

    Fresh forwards through the (already updated, now frozen) encoder, as Han et al.; energy net
    frozen. G(h_p) leaves G's running statistics alone (they reuse the upper level's samples).
    """
    mu, logvar = encoder(v)
    recon = reconstruction_error(generator(reparameterize(mu, logvar)), v).mean()
    with running_stats_untouched(generator):
        v_hat = generator(h_p)
    e_term = energy_term(energy_net(v_hat))
    nll = triangle_latent_nll(h_p, *encoder(v_hat))
    loss = recon + e_term + w_latent * nll
    return LowerLevelTerms(loss, None, recon, None, e_term, nll, None)


# ---------------------------------------------------------------- objectives as objects


class UpperLevelTerms(NamedTuple):
    loss: torch.Tensor
    energy_data: torch.Tensor  # E(v), shape (B,)
    energy_samples: torch.Tensor  # E(v_hat), shape (B,)
    energy_noise: Optional[torch.Tensor] = None  # E(noise), shape (B,), with objective.noise_negatives


ENCODER_GENERATOR = ("encoder", "generator")


class Objective:
    """One `objective.name`: which nets each level trains and the losses it computes.

    The engine runs, per batch, `upper_level` (if `has_upper_level`) training the nets named in
    `upper_level_trains`, then, for each phase of `lower_level_phases` in turn, `lower_level`
    with `phase` = the nets that phase trains (one backward and one optimizer step per phase);
    the energy net is always frozen there. Trained nets are passed as they are; frozen ones through
    `frozen_call` (`Frozen`); `frozen_encoder` is always the frozen encoder.
    """

    name = ""
    has_upper_level = True
    upper_level_trains: tuple[str, ...] = ("energy",)
    lower_level_phases: tuple[tuple[str, ...], ...] = (ENCODER_GENERATOR,)
    # What `ood_scorer` computes, as the evaluation report names it, and whether it runs the
    # generator (then the report says which generator, trained or EMA, scored).
    ood_score = "-E(v)"
    ood_score_uses_generator = False

    def __init__(self, cfg, arch: str = "dcgan"):
        self.cfg = cfg  # bidvl.config.ObjectiveConfig (`auto` values resolved by bidvl.config.resolve)
        settings = auto_settings(cfg, arch)
        self.latent_reduction = settings["latent_reduction"]
        self.fresh_latents = settings["lower_latents"] == "fresh"

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        """Eq. (14): E runs once on cat(v, v_hat); v_hat carries no gradient. With
        objective.noise_negatives = w > 0, uniform noise u (as many as v, drawn from the global RNG)
        joins the one forward, cat(v, v_hat, u), and w x noise_negatives_term is added."""
        weight = getattr(self.cfg, "noise_negatives", 0.0)
        parts = [v, v_hat.to(v.dtype)] + ([torch.rand_like(v) * 2 - 1] if weight > 0 else [])
        energies = energy_net(torch.cat(parts))
        b = len(v)
        e_data, e_samples = energies[:b], energies[b:2 * b]
        loss = upper_level_loss(e_data, e_samples, self.cfg.upper_loss)
        if weight <= 0:
            return UpperLevelTerms(loss, e_data, e_samples)
        e_noise = energies[2 * b:]
        loss = loss + weight * noise_negatives_term(e_data, e_noise, self.cfg.upper_loss)
        return UpperLevelTerms(loss, e_data, e_samples, e_noise)

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder,
                    phase=ENCODER_GENERATOR) -> LowerLevelTerms:
        raise NotImplementedError

    def ood_scorer(self, energy_net, encoder, generator) -> nn.Module:
        """What scores an image (lower = more in-distribution) for OOD AUROC and run health:
        the energy net E(v)."""
        return energy_net

    def describe(self) -> str:
        """One line for the model card: the objective and its settings."""
        raise NotImplementedError

    def deepspeed_problem(self) -> str | None:
        """Why this objective cannot train under DeepSpeed ZeRO (bidvl.distributed), or None.
        ZeRO keeps one flat optimizer per engine: an objective that steps part of an engine's nets
        alone (the encoder without the generator) cannot run there."""
        return None


def auto_settings(cfg, arch: str) -> dict[str, str]:
    """objective.latent_reduction and objective.lower_latents with `auto` replaced by what the
    authors' scripts for `arch` do (docs/fidelity.md): sum_over_dims and fresh latents for resnet,
    mean and reused latents otherwise. The rule bidvl.config.resolve applies once per run."""
    resnet = arch == "resnet"
    auto = {"latent_reduction": "sum_over_dims" if resnet else "mean", "lower_latents": "fresh" if resnet else "reuse"}
    return {key: auto[key] if getattr(cfg, key, "auto") == "auto" else getattr(cfg, key) for key in auto}


class BiDVL(Objective):
    """The paper's objective: Eq. (13)/(11) in the lower level, Eq. (14) in the upper level (plus,
    in `not_offset`, the encoder's KL(q(h|v_hat) || p(h)) of Sec. 4.4)."""

    name = "bidvl"

    def __init__(self, cfg, arch: str = "dcgan"):
        super().__init__(cfg, arch)
        if cfg.latent_term == "not_offset":
            self.upper_level_trains = ("energy", "encoder")

    def describe(self) -> str:
        o = self.cfg
        return (f"bidvl: latent term {o.latent_term} (w {o.w_latent:g}), r' {o.r_basic:g} (bias {o.ratio_bias}), "
                f"upper loss {o.upper_loss}, N = {o.lower_steps}, {o.order}")

    def deepspeed_problem(self) -> str | None:
        if self.cfg.latent_term == "not_offset":
            return ("objective.latent_term=not_offset under DeepSpeed: its upper level steps the encoder alone, "
                    "which ZeRO's flat optimizer cannot do; use DDP")
        return None

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        terms = super().upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
        if self.cfg.latent_term != "not_offset":
            return terms
        mu, logvar = encoder(v_hat)
        kl = upper_level_encoder_kl(mu, logvar, self.latent_reduction)
        return terms._replace(loss=terms.loss + self.cfg.w_latent * kl)

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder,
                    phase=ENCODER_GENERATOR) -> LowerLevelTerms:
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
            latent_reduction=self.latent_reduction, fresh_latents=self.fresh_latents,
        )


class VAE(Objective):
    """Baseline: the negative ELBO; no upper level (the energy net is never trained)."""

    name = "vae"
    has_upper_level = False
    upper_level_trains = ()
    ood_score = "ELBO(v) at h = mu(v) (VAE: -[recon + KL])"
    ood_score_uses_generator = True

    def upper_level(self, v, v_hat, *, energy_net, encoder) -> UpperLevelTerms:
        raise RuntimeError("the vae objective has no upper level")

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder,
                    phase=ENCODER_GENERATOR) -> LowerLevelTerms:
        return vae_loss(v, encoder=encoder, generator=generator)

    def describe(self) -> str:
        return "vae (baseline: negative ELBO)"

    def ood_scorer(self, energy_net, encoder, generator) -> nn.Module:
        """No trained energy net: the negative ELBO at h = mu(v) (`NegativeElbo`)."""
        return NegativeElbo(encoder, generator)


class DivergenceTriangle(Objective):
    """Baseline (Han et al., CVPR 2019), as enijkamp/triangle `train_cifar10.py` runs it: the energy
    net on Eq. (14)'s `difference` loss, then the encoder on `triangle_encoder_loss`, then the
    generator on `triangle_generator_loss`, each phase its own backward and optimizer step with
    fresh forwards (the generator's phase sees the updated encoder). Their nets: model.arch=triangle.
    """

    name = "divergence_triangle"
    lower_level_phases = (("encoder",), ("generator",))

    def lower_level(self, v, h_p, *, energy_net, encoder, generator, frozen_encoder,
                    phase=ENCODER_GENERATOR) -> LowerLevelTerms:
        if phase == ("encoder",):
            return triangle_encoder_loss(v, h_p, encoder=encoder, generator=generator,
                                         w_latent=self.cfg.w_latent)
        if phase == ("generator",):
            return triangle_generator_loss(v, h_p, energy_net=energy_net, encoder=frozen_encoder,
                                           generator=generator, w_latent=self.cfg.w_latent)
        raise ValueError(f"the divergence_triangle objective has the lower-level phases "
                         f"{self.lower_level_phases}, not {phase}")

    def describe(self) -> str:
        return f"divergence_triangle (baseline, Han et al. 2019), w_latent {self.cfg.w_latent:g}"

    def deepspeed_problem(self) -> str | None:
        return ("objective.name=divergence_triangle under DeepSpeed: it steps the encoder and the generator "
                "one after the other, which ZeRO's flat optimizer cannot do; use DDP")


OBJECTIVES = {o.name: o for o in (BiDVL, VAE, DivergenceTriangle)}


def build(cfg) -> Objective:
    """The objective object of `cfg.objective` (a Config, or its ObjectiveConfig: `auto` settings
    then resolve as for model.arch=dcgan)."""
    o = getattr(cfg, "objective", cfg)
    if o.name not in OBJECTIVES:
        raise ValueError(f"objective.name={o.name!r}: expected one of {', '.join(OBJECTIVES)}")
    model = getattr(cfg, "model", None)
    return OBJECTIVES[o.name](o, arch=model.arch if model is not None else "dcgan")


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
