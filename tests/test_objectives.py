"""The BiDVL terms: values against hand computation, and which parameters each term moves."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from bidvl import objectives

H, C, R, B = 4, 1, 4, 6


class TinyEnergy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(C * R * R, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, v):
        return self.net(v).squeeze(1)


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(C * R * R, 2 * H))

    def forward(self, v):
        mu, logvar = self.net(v).chunk(2, dim=1)
        return mu, logvar


class TinyGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(H, C * R * R)

    def forward(self, h):
        return torch.tanh(self.net(h)).view(-1, C, R, R)


@pytest.fixture
def nets():
    torch.manual_seed(0)
    return TinyEnergy().double(), TinyEncoder().double(), TinyGenerator().double()


def grads_of(module):
    return [p.grad for p in module.parameters()]


def has_grad(module):
    return any(g is not None and g.abs().sum() > 0 for g in grads_of(module))


def data():
    torch.manual_seed(1)
    return torch.rand(B, C, R, R, dtype=torch.float64) * 2 - 1, torch.randn(B, H, dtype=torch.float64)


def lower(nets, latent_mode="offset", w_latent=1.0, r_basic=0.05, ratio_bias="none"):
    energy_net, encoder, generator = nets
    v, h_p = data()
    enc_latent = encoder if latent_mode == "not_offset" else partial(objectives.frozen_call, encoder)
    e_data = energy_net(v).detach() if ratio_bias == "sigmoid" else None
    return objectives.lower_level_loss(
        v, h_p, energy_net=partial(objectives.frozen_call, energy_net), encoder=encoder, generator=generator,
        encoder_for_latent=enc_latent, latent_mode=latent_mode, w_latent=w_latent, r_basic=r_basic,
        ratio_bias=ratio_bias, energy_data=e_data,
    )


def test_offset_latent_term_moves_generator_only(nets):
    energy_net, encoder, generator = nets
    lower(nets).latent.backward()
    assert has_grad(generator)
    assert not has_grad(encoder)
    assert all(g is None for g in grads_of(energy_net))


def test_not_offset_latent_term_also_moves_encoder(nets):
    energy_net, encoder, generator = nets
    lower(nets, latent_mode="not_offset").latent.backward()
    assert has_grad(generator) and has_grad(encoder)
    assert all(g is None for g in grads_of(energy_net))


def test_energy_term_reaches_generator_through_frozen_energy_net(nets):
    energy_net, encoder, generator = nets
    lower(nets).energy.backward()
    assert has_grad(generator)
    assert all(g is None for g in grads_of(energy_net))
    assert not has_grad(encoder)


def test_weighted_vae_term_moves_encoder_and_generator(nets):
    energy_net, encoder, generator = nets
    lower(nets).weighted_vae.backward()
    assert has_grad(encoder) and has_grad(generator)
    assert all(g is None for g in grads_of(energy_net))


def test_none_variant_drops_latent_term(nets):
    terms = lower(nets, latent_mode="none")
    assert terms.latent.item() == 0.0
    torch.testing.assert_close(terms.loss, terms.energy + terms.weighted_vae)


def test_lower_level_loss_is_the_sum_of_its_terms(nets):
    terms = lower(nets, w_latent=0.3, r_basic=0.5)
    torch.testing.assert_close(terms.loss, terms.energy + 0.3 * terms.latent + terms.weighted_vae)
    # r' multiplies the per-sample (recon + kl); with bias none the mean is r' * (recon + kl).
    torch.testing.assert_close(terms.weighted_vae, 0.5 * (terms.recon + terms.kl), check_dtype=False)


def test_kl_matches_torch_distributions():
    mu, logvar = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(objectives.kl_to_prior(mu, logvar), expected.float(), check_dtype=False)


def test_reconstruction_and_latent_terms_by_hand():
    x = torch.tensor([[[[1.0, 0.0]]], [[[0.5, 0.5]]]])
    v = torch.zeros_like(x)
    assert objectives.reconstruction_error(x, v).tolist() == [1.0, 0.5]
    mu = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    h = torch.zeros(2, 2)
    assert objectives.latent_term(mu, h).item() == pytest.approx((1 + 4) / 2 / 2)


def test_latent_term_reductions_by_hand():
    mu, h = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.zeros(2, 2)
    assert objectives.latent_term(mu, h, "mean").item() == pytest.approx((1 + 4) / 2 / 2)  # DCGAN scripts
    assert objectives.latent_term(mu, h, "sum_over_dims").item() == pytest.approx((1 + 4) / 2)  # ResNet scripts
    with pytest.raises(ValueError, match="objective.latent_reduction"):
        objectives.latent_term(mu, h, "sum")


def test_auto_settings_follow_the_arch():
    """latent_reduction and lower_latents `auto`: the ResNet scripts' choices for model.arch=resnet,
    the DCGAN scripts' otherwise; explicit values win."""
    from bidvl.config import load_config

    resnet = objectives.build(load_config(None, ["model.arch=resnet"]))
    assert (resnet.latent_reduction, resnet.fresh_latents) == ("sum_over_dims", True)
    dcgan = objectives.build(load_config(None, []))
    assert (dcgan.latent_reduction, dcgan.fresh_latents) == ("mean", False)
    explicit = objectives.build(load_config(None, ["model.arch=resnet", "objective.latent_reduction=mean",
                                                   "objective.lower_latents=reuse"]))
    assert (explicit.latent_reduction, explicit.fresh_latents) == ("mean", False)


def test_fresh_latents_are_drawn_after_the_reparameterisation_noise(nets):
    """As the authors' ResNet scripts: eps = randn_like(logvar), then h_hat = randn(bs, h_dim)."""
    energy_net, encoder, generator = nets
    v, h_p = data()
    frozen_encoder = partial(objectives.frozen_call, encoder)
    kwargs = {"energy_net": partial(objectives.frozen_call, energy_net), "encoder": encoder, "generator": generator,
              "encoder_for_latent": frozen_encoder, "latent_mode": "offset", "w_latent": 1e-4, "r_basic": 0.05,
              "ratio_bias": "none", "latent_reduction": "sum_over_dims"}
    torch.manual_seed(5)
    fresh = objectives.lower_level_loss(v, h_p, fresh_latents=True, **kwargs)
    torch.manual_seed(5)
    torch.randn(B, H, dtype=torch.float64)  # eps
    h_new = torch.randn(B, H, dtype=torch.float64)
    by_hand = ((frozen_encoder(generator(h_new))[0] - h_new) ** 2).sum() / B
    torch.testing.assert_close(fresh.latent, by_hand)
    torch.manual_seed(5)
    reused = objectives.lower_level_loss(v, h_p, fresh_latents=False, **kwargs)
    assert not torch.allclose(reused.latent, fresh.latent)
    torch.testing.assert_close(reused.recon, fresh.recon)  # the same eps


def test_importance_ratio():
    e = torch.tensor([0.0, 2.0])
    assert objectives.importance_ratio(e, 0.05, "none").tolist() == pytest.approx([0.05, 0.05])
    r = objectives.importance_ratio(e, 0.5, "sigmoid")
    assert r.tolist() == pytest.approx([0.5 * torch.sigmoid(torch.tensor(1.0)).item(),
                                        0.5 * torch.sigmoid(torch.tensor(-1.0)).item()])
    with pytest.raises(ValueError, match="objective.ratio_bias"):
        objectives.importance_ratio(e, 0.5, "bogus")


def test_sigmoid_bias_changes_weighting(nets):
    a = lower(nets, ratio_bias="none", r_basic=1.0)
    b = lower(nets, ratio_bias="sigmoid", r_basic=1.0)
    assert b.ratio.item() < a.ratio.item()  # sigmoid in (0, 1)


def test_upper_level_values():
    e_data, e_samples = torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 3.0])
    assert objectives.upper_level_loss(e_data, e_samples, "difference").item() == pytest.approx(-1.0 - 2.0)
    # hinge: mean relu(1 + E(v)) + mean relu(1 - E(v_hat)) = mean(0, 1) + mean(0, 0)
    assert objectives.upper_level_loss(e_data, e_samples, "hinge").item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="objective.upper_loss"):
        objectives.upper_level_loss(e_data, e_samples, "bogus")


def test_upper_level_gradient_is_data_minus_sample_energy_gradients(nets):
    """Eq. (14): grad = mean grad E(data) - mean grad E(samples), summed sample by sample."""
    energy_net, encoder, generator = nets
    v, h_p = data()
    with torch.no_grad():
        v_hat = generator(h_p)
    loss = objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference")
    loss.backward()
    autograd = [p.grad.clone() for p in energy_net.parameters()]
    energy_net.zero_grad()
    expected = [torch.zeros_like(p) for p in energy_net.parameters()]
    for x, sign in ((v, 1.0), (v_hat, -1.0)):
        for i in range(B):
            g = torch.autograd.grad(energy_net(x[i: i + 1]).sum(), list(energy_net.parameters()))
            for e, gi in zip(expected, g):
                e += sign * gi / B
    for a, e in zip(autograd, expected):
        torch.testing.assert_close(a, e)
    # ... and matches central finite differences on the first layer's bias (float64).
    p = energy_net.net[1].bias
    eps = 1e-6
    for j in range(3):
        with torch.no_grad():
            p[j] += eps
            up = objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference").item()
            p[j] -= 2 * eps
            down = objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference").item()
            p[j] += eps
        assert (up - down) / (2 * eps) == pytest.approx(autograd[1][j].item(), rel=1e-5, abs=1e-8)


def test_upper_level_encoder_kl_moves_encoder_only(nets):
    energy_net, encoder, generator = nets
    v, h_p = data()
    with torch.no_grad():
        v_hat = generator(h_p)
    mu, logvar = encoder(v_hat)
    objectives.upper_level_encoder_kl(mu, logvar).backward()
    assert has_grad(encoder)
    assert all(g is None for g in grads_of(generator))


def test_frozen_call_matches_forward_and_keeps_spectral_norm_buffers():
    torch.manual_seed(0)
    net = nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3))
    x = torch.randn(5, 4, requires_grad=True)
    net.eval()
    torch.testing.assert_close(objectives.frozen_call(net, x), net(x))
    net.train()
    u_before = net.parametrizations.weight[0]._u.clone()
    out = objectives.frozen_call(net, x)
    assert not torch.equal(u_before, net.parametrizations.weight[0]._u)  # power iteration ran
    out.sum().backward()
    assert x.grad is not None
    assert net.parametrizations.weight.original.grad is None and net.bias.grad is None


# ---------------------------------------------------------------- baselines


def test_vae_loss_is_negative_elbo_and_moves_encoder_and_generator_only(nets):
    energy_net, encoder, generator = nets
    v, _ = data()
    torch.manual_seed(2)
    terms = objectives.vae_loss(v, encoder=encoder, generator=generator)
    torch.testing.assert_close(terms.loss, terms.recon + terms.kl, check_dtype=False)
    # by hand, with the same reparameterisation noise
    torch.manual_seed(2)
    mu, logvar = encoder(v)
    h = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    by_hand = ((generator(h) - v) ** 2).flatten(1).sum(1) + 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(terms.loss, by_hand.mean(), check_dtype=False)
    terms.loss.backward()
    assert has_grad(encoder) and has_grad(generator)
    assert all(g is None for g in grads_of(energy_net))


class TinyBatchNormGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(H, 8), nn.BatchNorm1d(8), nn.Linear(8, C * R * R))

    def forward(self, h):
        return torch.tanh(self.net(h)).view(-1, C, R, R)


def test_triangle_kl_is_a_mean_over_batch_and_latent_dims():
    """Han et al.'s KL is kl_to_prior / h_dim (batch mean): h_dim times weaker than BiDVL's."""
    mu, logvar = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    torch.testing.assert_close(objectives.triangle_kl(mu, logvar), objectives.kl_to_prior(mu, logvar).mean() / H)


def test_triangle_latent_nll_is_the_gaussian_nll_without_its_constant():
    h, mu = torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    logvar = torch.rand(B, H, dtype=torch.float64) * 4 + 6  # variances >> 1e-6: their epsilon is negligible
    nll = -torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(h).sum(1).mean()
    expected = nll - 0.5 * H * math.log(2 * math.pi)
    torch.testing.assert_close(objectives.triangle_latent_nll(h, mu, logvar), expected, rtol=1e-7, atol=0)


def test_running_stats_untouched_normalises_with_the_batch_and_keeps_the_statistics():
    torch.manual_seed(0)
    generator = TinyBatchNormGenerator().double()
    h = torch.randn(B, H, dtype=torch.float64)
    bn = generator.net[1]
    before = [b.clone() for b in bn.buffers()]
    with objectives.running_stats_untouched(objectives.Frozen(generator)):
        inside = generator(h)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
    assert bn.track_running_stats
    torch.testing.assert_close(inside, generator(h))  # batch statistics, as in a training forward
    assert not torch.equal(before[0], bn.running_mean)  # ... which updates them


def test_triangle_phases_train_only_their_net(nets):
    """Encoder phase: recon + KL + 0.1 NLL moves the encoder only (G frozen, G(h_p) detached);
    generator phase: recon + E(G(h_p)) + 0.1 NLL moves G only (encoder and energy net frozen)."""
    from bidvl.config import ObjectiveConfig

    energy_net, encoder, _ = nets
    generator = TinyBatchNormGenerator().double()
    objective = objectives.build(ObjectiveConfig(name="divergence_triangle", w_latent=0.1))
    assert objective.lower_level_phases == (("encoder",), ("generator",))
    v, h_p = data()
    frozen = {"energy_net": objectives.Frozen(energy_net), "frozen_encoder": objectives.Frozen(encoder)}
    statistics = [b.clone() for b in generator.buffers()]
    terms = objective.lower_level(v, h_p, encoder=encoder, generator=objectives.Frozen(generator),
                                  phase=("encoder",), **frozen)
    torch.testing.assert_close(terms.loss, terms.recon + terms.kl + 0.1 * terms.latent)
    assert terms.energy is None and terms.ratio is None
    terms.loss.backward()
    assert has_grad(encoder) and all(g is None for g in grads_of(generator))
    # one running-statistics update (the reconstruction), none for G(h_p)
    generator.train()
    encoder.zero_grad(set_to_none=True)
    terms = objective.lower_level(v, h_p, encoder=objectives.Frozen(encoder), generator=generator,
                                  phase=("generator",), **frozen)
    torch.testing.assert_close(terms.loss, terms.recon + terms.energy + 0.1 * terms.latent)
    assert terms.kl is None
    terms.loss.backward()
    assert has_grad(generator) and all(g is None for g in grads_of(encoder))
    assert all(g is None for g in grads_of(energy_net))
    assert generator.net[1].num_batches_tracked.item() == statistics[2].item() + 2  # recon forwards only
    with pytest.raises(ValueError, match="phases"):
        objective.lower_level(v, h_p, encoder=encoder, generator=generator, phase=("encoder", "generator"),
                              **frozen)


def test_negative_elbo_scores_like_an_energy(nets):
    _, encoder, generator = nets
    v, _ = data()
    score = objectives.NegativeElbo(encoder, generator)(v)
    mu, logvar = encoder(v)
    expected = ((generator(mu) - v) ** 2).flatten(1).sum(1) + 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(score, expected, check_dtype=False)
    assert score.shape == (B,)


def test_objective_objects_say_what_each_level_trains():
    from bidvl.config import ObjectiveConfig

    both = (("encoder", "generator"),)
    cases = {("bidvl", "offset"): (True, ("energy",), both),
             ("bidvl", "not_offset"): (True, ("energy", "encoder"), both),
             ("vae", "offset"): (False, (), both),
             ("divergence_triangle", "offset"): (True, ("energy",), (("encoder",), ("generator",)))}
    for (name, latent), (has_upper, trains, phases) in cases.items():
        objective = objectives.build(ObjectiveConfig(name=name, latent_term=latent))
        assert objective.name == name
        assert (objective.has_upper_level, objective.upper_level_trains) == (has_upper, trains)
        assert objective.lower_level_phases == phases
    with pytest.raises(ValueError, match="objective.name='gan'"):
        objectives.build(ObjectiveConfig(name="gan"))


@pytest.mark.parametrize("latent_mode", ["offset", "not_offset", "none"])
def test_bidvl_object_computes_the_functions(latent_mode):
    """The object is a thin composition: its losses equal the functions' for the same noise."""
    from bidvl.config import ObjectiveConfig

    torch.manual_seed(0)
    energy_net, encoder, generator = TinyEnergy(), TinyEncoder(), TinyGenerator()
    v, h_p = torch.rand(B, C, R, R) * 2 - 1, torch.randn(B, H)
    cfg = ObjectiveConfig(latent_term=latent_mode, ratio_bias="sigmoid", r_basic=0.3, w_latent=0.7)
    objective = objectives.build(cfg)
    frozen_energy, frozen_encoder = partial(objectives.frozen_call, energy_net), partial(objectives.frozen_call, encoder)
    torch.manual_seed(1)
    got = objective.lower_level(v, h_p, energy_net=frozen_energy, encoder=encoder, generator=generator,
                                frozen_encoder=frozen_encoder)
    torch.manual_seed(1)
    want = objectives.lower_level_loss(
        v, h_p, energy_net=frozen_energy, encoder=encoder, generator=generator,
        encoder_for_latent=encoder if latent_mode == "not_offset" else frozen_encoder, latent_mode=latent_mode,
        w_latent=0.7, r_basic=0.3, ratio_bias="sigmoid", energy_data=energy_net(v).detach())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    v_hat = generator(h_p).detach()
    upper = objective.upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
    expected = objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference")
    if latent_mode == "not_offset":
        expected = expected + 0.7 * objectives.upper_level_encoder_kl(*encoder(v_hat))
    torch.testing.assert_close(upper.loss, expected)


# ------------------------------------------------------------------ pinned by mutation testing (docs/testing.md)


def test_upper_level_encoder_kl_by_hand_and_per_arch():
    """`not_offset`'s upper-level KL is normalised like the latent term: sum / bs / h_dim (`mean`)
    or sum / bs (`sum_over_dims`, what the ResNet arch resolves to)."""
    from bidvl.config import ObjectiveConfig

    mu, logvar = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]])
    total = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum()
    assert objectives.upper_level_encoder_kl(mu, logvar, "mean").item() == pytest.approx(total.item() / 2 / 3)
    assert objectives.upper_level_encoder_kl(mu, logvar, "sum_over_dims").item() == pytest.approx(total.item() / 2)
    with pytest.raises(ValueError, match=r"^objective.latent_reduction='bogus': expected one of mean, sum_over_dims$"):
        objectives.upper_level_encoder_kl(mu, logvar, "bogus")
    with pytest.raises(ValueError, match=r"^objective.latent_reduction='bogus': expected one of mean, sum_over_dims$"):
        objectives.latent_term(mu, mu, "bogus")

    torch.manual_seed(0)
    energy_net, encoder = TinyEnergy(), TinyEncoder()
    v, v_hat = torch.rand(B, C, R, R) * 2 - 1, torch.rand(B, C, R, R) * 2 - 1
    cfg = ObjectiveConfig(latent_term="not_offset", w_latent=0.7)
    for arch, reduction in (("dcgan", "mean"), ("resnet", "sum_over_dims")):
        upper = objectives.OBJECTIVES["bidvl"](cfg, arch=arch).upper_level(v, v_hat, energy_net=energy_net,
                                                                           encoder=encoder)
        expected = (objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference")
                    + 0.7 * objectives.upper_level_encoder_kl(*encoder(v_hat), reduction))
        torch.testing.assert_close(upper.loss, expected)


@pytest.mark.parametrize("latent_mode", ["offset", "not_offset"])
def test_the_bidvl_object_lets_the_latent_term_reach_the_encoder_only_in_not_offset(latent_mode):
    from bidvl.config import ObjectiveConfig

    torch.manual_seed(0)
    energy_net, encoder, generator = TinyEnergy(), TinyEncoder(), TinyGenerator()
    v, h_p = torch.rand(B, C, R, R) * 2 - 1, torch.randn(B, H)
    objective = objectives.build(ObjectiveConfig(latent_term=latent_mode))
    terms = objective.lower_level(v, h_p, energy_net=objectives.Frozen(energy_net), encoder=encoder,
                                  generator=generator, frozen_encoder=objectives.Frozen(encoder))
    terms.latent.backward()
    assert has_grad(generator)
    assert has_grad(encoder) == (latent_mode == "not_offset")


def test_the_sigmoid_ratio_is_computed_from_the_data_energy(nets):
    energy_net, _, _ = nets
    v, _ = data()
    terms = lower(nets, ratio_bias="sigmoid", r_basic=0.5)
    expected = objectives.importance_ratio(energy_net(v).detach(), 0.5, "sigmoid").mean()
    torch.testing.assert_close(terms.ratio, expected)


def test_lower_level_errors_say_what_is_missing(nets):
    energy_net, encoder, generator = nets
    v, h_p = data()
    kwargs = dict(energy_net=partial(objectives.frozen_call, energy_net), encoder=encoder, generator=generator,
                  encoder_for_latent=encoder, w_latent=1.0, r_basic=0.05)
    with pytest.raises(ValueError, match=r"^the sigmoid ratio bias needs energy_data = E\(v\)$"):
        objectives.lower_level_loss(v, h_p, latent_mode="offset", ratio_bias="sigmoid", **kwargs)
    with pytest.raises(ValueError, match=r"^objective.latent_term='bogus': expected offset, not_offset or none$"):
        objectives.lower_level_loss(v, h_p, latent_mode="bogus", ratio_bias="none", **kwargs)
    from bidvl.config import ObjectiveConfig

    with pytest.raises(ValueError, match=r"expected one of bidvl, vae, divergence_triangle$"):
        objectives.build(ObjectiveConfig(name="gan"))
    with pytest.raises(RuntimeError, match="^the vae objective has no upper level$"):
        objectives.build(ObjectiveConfig(name="vae")).upper_level(v, v, energy_net=energy_net, encoder=encoder)


def test_losses_are_summed_in_at_least_float32():
    for dtype in (torch.float16, torch.bfloat16):
        assert objectives.at_least_float32(torch.ones(2, dtype=dtype)).dtype == torch.float32
    assert objectives.at_least_float32(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    ratio = objectives.importance_ratio(torch.zeros(3, dtype=torch.bfloat16), 0.05, "none")
    assert ratio.dtype == torch.float32 and ratio[0].item() == torch.tensor(0.05).item()  # not bf16's 0.05


def test_the_vae_object_reports_its_terms(nets):
    """The VAE's terms as logged: weighted_vae = loss = recon + KL, energy and latent 0, ratio 1."""
    from bidvl.config import ObjectiveConfig

    energy_net, encoder, generator = nets
    v, h_p = data()
    torch.manual_seed(3)
    terms = objectives.build(ObjectiveConfig(name="vae")).lower_level(
        v, h_p, energy_net=energy_net, encoder=encoder, generator=generator, frozen_encoder=encoder)
    torch.manual_seed(3)
    want = objectives.vae_loss(v, encoder=encoder, generator=generator)
    for a, b in zip(terms, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(terms.loss, terms.recon + terms.kl)
    assert terms.weighted_vae is terms.loss
    assert (terms.energy.item(), terms.latent.item(), terms.ratio.item()) == (0.0, 0.0, 1.0)


def test_the_triangle_encoder_phase_reports_recon_plus_kl(nets):
    _, encoder, generator = nets
    v, h_p = data()
    terms = objectives.triangle_encoder_loss(v, h_p, encoder=encoder, generator=generator, w_latent=0.1)
    torch.testing.assert_close(terms.weighted_vae, terms.recon + terms.kl)
    torch.testing.assert_close(terms.loss, terms.recon + terms.kl + 0.1 * terms.latent)


# ------------------------------------------------------------------ opt-in stabiliser: noise negatives


@pytest.mark.parametrize("form", ["difference", "hinge"])
def test_noise_negatives_add_the_upper_loss_against_uniform_noise_and_move_only_the_energy_net(nets, form):
    from bidvl.config import ObjectiveConfig

    energy_net, encoder, generator = nets
    v, h_p = data()
    v_hat = generator(h_p).detach()
    objective = objectives.build(ObjectiveConfig(upper_loss=form, noise_negatives=0.3))
    torch.manual_seed(5)
    terms = objective.upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
    torch.manual_seed(5)
    noise = torch.rand_like(v) * 2 - 1  # what the objective draws, from the same RNG state
    assert noise.min() >= -1 and noise.max() <= 1
    expected = (objectives.upper_level_loss(energy_net(v), energy_net(v_hat), form)
                + 0.3 * objectives.upper_level_loss(energy_net(v), energy_net(noise), form))
    torch.testing.assert_close(terms.loss, expected)
    torch.testing.assert_close(terms.energy_noise, energy_net(noise))
    terms.loss.backward()
    assert has_grad(energy_net) and not has_grad(encoder) and not has_grad(generator)


def test_without_noise_negatives_the_upper_level_draws_no_noise(nets):
    """The default (0) is the paper's upper level: no extra forward rows and no RNG use."""
    from bidvl.config import ObjectiveConfig

    energy_net, encoder, generator = nets
    v, h_p = data()
    v_hat = generator(h_p).detach()
    state = torch.get_rng_state()
    terms = objectives.build(ObjectiveConfig()).upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
    assert torch.equal(torch.get_rng_state(), state) and terms.energy_noise is None
    torch.testing.assert_close(terms.loss, objectives.upper_level_loss(energy_net(v), energy_net(v_hat), "difference"))


# ---------------------------------------------------------------- the objective owns its variants


def _cfg(*overrides):
    from bidvl.config import load_config

    return load_config("digits", list(overrides))


def test_each_objective_describes_itself_for_the_card():
    assert objectives.build(_cfg()).describe() == (
        "bidvl: latent term offset (w 1), r' 0.05 (bias none), upper loss difference, N = 1, upper_first")
    assert objectives.build(_cfg("objective.name=vae")).describe() == "vae (baseline: negative ELBO)"
    assert objectives.build(_cfg("objective.name=divergence_triangle", "objective.w_latent=0.5")).describe() == (
        "divergence_triangle (baseline, Han et al. 2019), w_latent 0.5")


def test_each_objective_names_its_ood_score_and_whether_the_generator_enters_it():
    bidvl, vae = objectives.build(_cfg()), objectives.build(_cfg("objective.name=vae"))
    nets = (nn.Linear(2, 1), nn.Linear(2, 2), nn.Linear(2, 2))
    assert bidvl.ood_scorer(*nets) is nets[0] and bidvl.ood_score == "-E(v)"
    assert not bidvl.ood_score_uses_generator
    assert isinstance(vae.ood_scorer(*nets), objectives.NegativeElbo) and vae.ood_score_uses_generator
    assert "ELBO" in vae.ood_score


@pytest.mark.parametrize("overrides, refused", [
    ((), None), (("objective.name=vae",), None),
    (("objective.latent_term=not_offset",), "objective.latent_term=not_offset under DeepSpeed"),
    (("objective.name=divergence_triangle",), "objective.name=divergence_triangle under DeepSpeed"),
])
def test_deepspeed_refuses_what_the_objective_says_it_cannot_run(monkeypatch, overrides, refused):
    from bidvl import distributed
    from bidvl.config import ConfigError

    cfg = _cfg(*overrides)
    problem = objectives.build(cfg).deepspeed_problem()
    assert problem is None if refused is None else problem.startswith(refused)
    if refused is None:
        return
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(ConfigError, match=refused):
        distributed.deepspeed_plugins(cfg)


def test_no_module_outside_objectives_branches_on_the_objective_name():
    import re
    from pathlib import Path

    branch = re.compile(r"objective\.name\s*(==|!=|in\b)|[=!]=\s*[\"'](vae|bidvl|divergence_triangle)[\"']")
    root = Path(objectives.__file__).parent
    found = [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py")) if path.name != "objectives.py"
             and path.relative_to(root).parts[0] != "study"  # (the study package: `vae` is a run name there)
             for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert found == []
