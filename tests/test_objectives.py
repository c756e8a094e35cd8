"""The BiDVL terms: values against hand computation, and which parameters each term moves."""

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


def dt_terms(nets, w_latent=0.1):
    energy_net, encoder, generator = nets
    v, h_p = data()
    return objectives.divergence_triangle_loss(v, h_p, energy_net=partial(objectives.frozen_call, energy_net),
                                        encoder=encoder, generator=generator, w_latent=w_latent)


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


def test_gaussian_nll_matches_torch_distributions():
    h, mu, logvar = (torch.randn(B, H, dtype=torch.float64) for _ in range(3))
    expected = -torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(h).sum(1)
    torch.testing.assert_close(objectives.gaussian_nll(h, mu, logvar), expected)


def test_divergence_triangle_loss_is_the_sum_of_its_terms(nets):
    terms = dt_terms(nets, w_latent=0.1)
    torch.testing.assert_close(terms.loss, terms.weighted_vae + terms.energy + 0.1 * terms.latent)
    torch.testing.assert_close(terms.weighted_vae, terms.recon + terms.kl)


def test_divergence_triangle_gradients_split_as_han_et_al(nets):
    """Encoder: recon + KL + 0.1 NLL; generator: recon + E(G(z)) + 0.1 NLL; energy net: nothing."""
    energy_net, encoder, generator = nets
    torch.manual_seed(3)  # the same reparameterisation noise in both evaluations
    t = dt_terms(nets)
    enc_sep = torch.autograd.grad(t.recon + t.kl + 0.1 * t.latent, list(encoder.parameters()), retain_graph=True)
    gen_sep = torch.autograd.grad(t.recon + t.energy + 0.1 * t.latent, list(generator.parameters()))
    torch.manual_seed(3)
    t = dt_terms(nets)
    enc_joint = torch.autograd.grad(t.loss, list(encoder.parameters()), retain_graph=True)
    gen_joint = torch.autograd.grad(t.loss, list(generator.parameters()))
    for a, b in zip(enc_joint + gen_joint, enc_sep + gen_sep):
        torch.testing.assert_close(a, b)
    assert any(g.abs().sum() > 0 for g in enc_joint) and any(g.abs().sum() > 0 for g in gen_joint)
    # Which terms reach which net:
    for name, moves_encoder, moves_generator in (("energy", False, True), ("kl", True, False),
                                                 ("latent", True, True), ("recon", True, True)):
        encoder.zero_grad(set_to_none=True)
        generator.zero_grad(set_to_none=True)
        getattr(dt_terms(nets), name).backward()
        assert has_grad(encoder) == moves_encoder, name
        assert has_grad(generator) == moves_generator, name
        assert all(g is None for g in grads_of(energy_net)), name


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

    cases = {("bidvl", "offset"): (True, ("energy",)), ("bidvl", "not_offset"): (True, ("energy", "encoder")),
             ("vae", "offset"): (False, ()), ("divergence_triangle", "offset"): (True, ("energy",))}
    for (name, latent), (has_upper, trains) in cases.items():
        objective = objectives.build(ObjectiveConfig(name=name, latent_term=latent))
        assert objective.name == name
        assert (objective.has_upper_level, objective.upper_level_trains) == (has_upper, trains)
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
