"""train.compile (issue 28): each level's terms are one torch.compile'd graph (fullgraph: a graph
break raises), compiled once, and 20 compiled steps equal 20 eager ones on every shipped config
(tiny widths, the CPU). These checks trace with train.compile_backend=aot_eager: dynamo and
AOTAutograd, the graphs inductor receives, without its code generation (a cold inductor compile
takes minutes on 2 cores); test_inductor_compiles_the_levels runs inductor itself, on one config."""

import copy

import pytest
import torch

from conftest import REPO

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
BATCH, STEPS = 4, 20
TINY_NETS = ["model.latent_dim=6", "model.energy_width=4", "model.encoder_width=4", "model.generator_width=4",
             f"train.batch_size={BATCH}", "data.num_workers=0", "data.auto_build=''", "train.mixed_precision=no"]
# The nets' outputs (E(v), the encoder's (mu, log var), G(h), in train and in eval mode) on fixed
# inputs after 20 steps, relative to the largest output, in float64 (as tests/test_equivalence.py):
# there round-off (1e-16), grown by 20 Adam steps, leaves ~3e-9 (cifar10_resnet; as much as
# changing one input of the first step by 1e-15 does), far below what a wrong graph gives (1e-2 and
# more). In float32 the same steps amplify round-off to ~5e-3 after one step (Adam's first update is
# lr x sign(g), and a near-zero g's sign is round-off), which hides nothing less than 1e-2.
TOLERANCE = 1e-6


def outputs(trainer, cfg) -> dict:
    g = torch.Generator().manual_seed(2)
    c, r = cfg.data.channels, cfg.data.resolution
    v = torch.rand(8, c, r, r, generator=g, dtype=torch.float64) * 2 - 1
    h = torch.randn(8, cfg.model.latent_dim, generator=g, dtype=torch.float64)
    out = {}
    with torch.no_grad():
        for mode in ("train", "eval"):
            nets = {name: copy.deepcopy(net).train(mode == "train") for name, net in trainer.unwrapped.items()}
            mu, logvar = nets["encoder"](v)
            out |= {f"{mode} E(v)": nets["energy"](v), f"{mode} mu": mu, f"{mode} logvar": logvar,
                    f"{mode} G(h)": nets["generator"](h)}
    return out


def outputs_after(tmp_path, config, steps, *overrides):
    """The nets' outputs (`outputs`) after `steps` train_steps on fixed random batches and prior
    draws, and the number of levels the trainer made a function (a compiled graph) for."""
    from bidvl.config import load_config
    from bidvl.engine import Trainer

    torch._dynamo.reset()
    cfg = load_config(REPO / "configs" / config, [*TINY_NETS, f"run.dir={tmp_path / 'run'}", *overrides])
    trainer = Trainer(cfg)
    for net in trainer.unwrapped.values():
        net.double()  # (the optimizers' state is made at their first step)
    try:
        g = torch.Generator().manual_seed(1)
        c, r = cfg.data.channels, cfg.data.resolution
        for _ in range(steps):
            v = torch.rand(BATCH, c, r, r, generator=g, dtype=torch.float64) * 2 - 1
            trainer.train_step([v], [torch.randn(BATCH, cfg.model.latent_dim, generator=g, dtype=torch.float64)])
        return outputs(trainer, cfg), len(trainer._levels)
    finally:
        trainer.close()


def assert_close_outputs(eager, compiled):
    assert eager.keys() == compiled.keys()
    errors = {k: ((eager[k] - compiled[k]).abs().max() / eager[k].abs().max()).item() for k in eager}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.3g}"


@pytest.mark.slow  # 2.6 min for the nine configs on 2 cores: in the full tier, not make test-fast
@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_levels_equal_eager_after_20_steps(tmp_path, config):
    from torch._dynamo.utils import counters

    eager, _ = outputs_after(tmp_path / "eager", config, STEPS)
    counters.clear()
    compiled, levels = outputs_after(tmp_path / "compiled", config, STEPS, "train.compile=true",
                                     "train.compile_backend=aot_eager")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == levels >= 1, dict(counters["stats"])  # once each
    assert_close_outputs(eager, compiled)


@pytest.mark.slow
def test_inductor_compiles_the_levels(tmp_path):
    """inductor's own code (C++ on the CPU) for the digits config's levels: no graph break, one
    compile each, 20 steps equal to eager. inductor draws random numbers its own way unless
    fallback_random: set here so that both runs draw the same reparameterisation noise."""
    from torch._dynamo.utils import counters

    eager, _ = outputs_after(tmp_path / "eager", "digits.yaml", STEPS)
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        compiled, levels = outputs_after(tmp_path / "compiled", "digits.yaml", STEPS, "train.compile=true")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == levels >= 1, dict(counters["stats"])
    assert_close_outputs(eager, compiled)
