"""Run health (bidvl.health): the measures, the verdicts on synthetic failures, the checks inside
training (lines, tags, card, API), and the policies (stop, restart) with an exact resume."""

import json
import math
import signal

import pytest
import torch
from torch import nn

from conftest import REPO, TINY
from bidvl import health
from bidvl.config import ConfigError, load_config
from bidvl.data import eval_stream


def tiny_cfg(tmp_path, shards, *overrides):
    return load_config(REPO / "configs/digits.yaml",
                       [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={shards}", *overrides])


def split_images(shards, split):
    return torch.cat([images[index >= 0] for images, _, index in eval_stream(str(shards), split, 64)])


# ---------------------------------------------------------------- synthetic nets


class LookupGenerator(nn.Module):
    """A 'generator' that returns real images, one picked by each latent: what a perfect one gives."""

    def __init__(self, images):
        super().__init__()
        self.register_buffer("images", images)

    def forward(self, h):
        return self.images[(h[:, 0].abs() * 1e4).long() % len(self.images)]


class CollapsedGenerator(nn.Module):
    """Every latent gives (nearly) the same image."""

    def __init__(self, image):
        super().__init__()
        self.register_buffer("image", image)

    def forward(self, h):
        return (self.image + 1e-3 * h[:, :1, None, None]).clamp(-1, 1)


class PlaidGenerator(nn.Module):
    """A plaid texture whose phase and contrast follow the latent: varied, but nothing like data."""

    def forward(self, h):
        r = 16
        y, x = torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij")
        phase = (h[:, 0].abs() * 10).long() % 2
        plaid = ((x[None] + y[None] + phase[:, None, None]) % 2).float() * 2 - 1
        return (plaid * h[:, 1].tanh().abs()[:, None, None]).unsqueeze(1)


class NearestTrainImageEnergy(nn.Module):
    """E(v) = distance to the nearest training image: low on data, high on anything else."""

    def __init__(self, images):
        super().__init__()
        self.register_buffer("images", images.flatten(1))

    def forward(self, v):
        return torch.cdist(v.flatten(1), self.images).min(1).values


class NoiseLovingEnergy(nn.Module):
    """E(v) = -(squared differences of neighbouring pixels): the rougher, the more likely."""

    def forward(self, v):
        return -(v[..., 1:, :] - v[..., :-1, :]).pow(2).flatten(1).mean(1)


class ZeroEncoder(nn.Module):
    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, v):
        z = torch.zeros(len(v), self.latent_dim)
        return z, z


@pytest.fixture(scope="module")
def probe_and_train(digits16, tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("probe"), digits16)
    return cfg, health.Probe.from_config(cfg), split_images(digits16, "train")


def verdict_of(cfg, probe, energy_net, generator, step=1000):
    figures = health.measure(probe, energy_net, ZeroEncoder(cfg.model.latent_dim), generator)
    return figures, health.judge(figures, {}, [], step, cfg.health)


def test_a_healthy_model_is_called_healthy(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (verdict, reasons, _) = verdict_of(cfg, probe, NearestTrainImageEnergy(train), LookupGenerator(train))
    assert verdict == "healthy", reasons
    assert 0.8 < figures["spread"] < 1.25 and 0.8 < figures["nn_ratio"] < 1.25 and 0.7 < figures["hf_ratio"] < 1.4
    for kind in health.NOISE_KINDS:
        assert figures[f"auroc_{kind}"] > 0.9, kind
    # The samples are training images (energy 0 here): the gap E(samples) - E(data) is -E(data).
    assert figures["energy_samples"] < 1e-3 * figures["energy_data"]  # cdist round-off
    assert figures["energy_gap"] == pytest.approx(figures["energy_samples"] - figures["energy_data"])
    assert figures["energy_gap"] < -0.99 * figures["energy_data"] < 0


def test_a_collapsed_generator_is_unhealthy_for_its_spread(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (verdict, reasons, keys) = verdict_of(cfg, probe, NearestTrainImageEnergy(train),
                                                   CollapsedGenerator(train[0]))
    assert verdict == "unhealthy"
    assert figures["spread"] < 0.05 and {"spread", "nn_ratio"} <= set(keys)
    assert any(r.startswith(f"samples collapsed: spread {figures['spread']:.2f} of the data's") for r in reasons)


def test_a_texture_generator_is_flagged_as_texture(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (verdict, reasons, keys) = verdict_of(cfg, probe, NearestTrainImageEnergy(train), PlaidGenerator())
    assert "hf_ratio" in keys and figures["hf_ratio"] > cfg.health.max_hf_ratio
    assert verdict in ("warning", "unhealthy")
    assert any(r.startswith("samples are texture: high-frequency energy") for r in reasons)


def test_an_energy_that_prefers_noise_is_unhealthy_naming_the_noise(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (verdict, reasons, keys) = verdict_of(cfg, probe, NoiseLovingEnergy(), LookupGenerator(train))
    assert verdict == "unhealthy" and "auroc_uniform" in keys
    assert f"the energy ranks uniform noise above data: AUROC {figures['auroc_uniform']:.2f}" in reasons
    assert figures["auroc_uniform"] < 0.1
    assert "spread" not in keys  # the samples are fine: only the energy is named


class FlatEnergy(nn.Module):
    """A softplus energy stuck at its floor: the same (tiny) value for every image."""

    def forward(self, v):
        return torch.nn.functional.softplus(v.flatten(1).sum(1) * 0 - 40.0)


def test_an_energy_at_its_floor_is_unhealthy_for_being_flat(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (verdict, reasons, keys) = verdict_of(cfg, probe, FlatEnergy(), LookupGenerator(train))
    assert figures["energy_spread"] == 0.0 and figures["energy_data"] < 1e-16
    assert verdict == "unhealthy" and "energy_spread" in keys
    assert "the energy is flat: it varies by 0 over data and samples (no learning signal for the generator)" in reasons
    healthy, _ = verdict_of(cfg, probe, NearestTrainImageEnergy(train), LookupGenerator(train))
    assert healthy["energy_spread"] > 1.0


def test_a_vae_score_that_prefers_noise_is_a_warning(probe_and_train):
    """The VAE trains no energy: its ELBO ranking blurred images above data is a property of the
    likelihood, named, but not a sign that training fails."""
    cfg, probe, train = probe_and_train
    figures, _ = verdict_of(cfg, probe, NoiseLovingEnergy(), LookupGenerator(train))
    verdict, reasons, keys = health.judge(figures, {}, [], 1000, cfg.health, energy_trained=False)
    assert verdict == "warning" and "auroc_uniform" in keys
    assert f"the score ranks uniform noise above data: AUROC {figures['auroc_uniform']:.2f}" in reasons


def test_thresholds_wait_for_the_warmup_but_non_finite_figures_do_not(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, _ = verdict_of(cfg, probe, NoiseLovingEnergy(), CollapsedGenerator(train[0]))
    early = health.judge(figures, {}, [], cfg.health.warmup - 1, cfg.health)
    assert early[0] == "healthy"
    nan = health.judge({**figures, "rmse": float("nan")}, {"grad_norm/energy_net": float("inf")}, [],
                       0, cfg.health)
    assert nan[0] == "unhealthy" and nan[1] == ["non-finite figures: grad_norm/energy_net, rmse"]


def test_reasons_say_since_when_and_trends_compare_with_the_best_so_far(probe_and_train):
    cfg, probe, train = probe_and_train
    figures, (_, _, keys) = verdict_of(cfg, probe, NearestTrainImageEnergy(train), CollapsedGenerator(train[0]))
    history = [{"step": 600, "figures": {**figures, "rmse": 0.1}, "keys": []},
               {"step": 800, "figures": figures, "keys": keys},
               {"step": 1000, "figures": figures, "keys": keys}]
    _, reasons, _ = health.judge({**figures, "rmse": 0.2}, {}, history, 1200, cfg.health)
    assert any(r.startswith("samples collapsed") and r.endswith("since step 800") for r in reasons)
    assert "reconstruction error rising: RMSE 0.200, best 0.100" in reasons


def test_prdc_of_a_set_with_itself_is_perfect_and_a_collapse_has_no_recall():
    torch.manual_seed(0)
    real = torch.randn(200, 8)
    # A set against itself: every point in its own ball too, so density is (k + 1) / k exactly.
    k = health.K_NEAREST
    assert health.prdc(real, real) == pytest.approx({"precision": 1.0, "recall": 1.0, "density": (k + 1) / k,
                                                     "coverage": 1.0})
    assert health.prdc(real[:100], real[100:])["density"] == pytest.approx(1.0, abs=0.25)  # same law
    collapsed = health.prdc(real, real[:1].repeat(200, 1) + 1e-4 * torch.randn(200, 8))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.05 and collapsed["coverage"] < 0.05
    far = health.prdc(real, real + 10.0)
    assert far["precision"] == 0.0 and far["density"] == 0.0


def test_a_check_changes_no_net_buffer_mode_or_global_rng(probe_and_train):
    from bidvl.models import build_nets

    cfg, probe, _ = probe_and_train
    torch.manual_seed(0)
    nets = build_nets(cfg.model, channels=1, resolution=16)
    nets.generator.train()
    nets.energy_net.train()
    nets.encoder.eval()
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    rng = torch.get_rng_state()
    first = health.measure(probe, nets.energy_net, nets.encoder, nets.generator)
    assert torch.equal(torch.get_rng_state(), rng)
    assert nets.generator.training and nets.energy_net.training and not nets.encoder.training
    for state, net in zip(before, nets):
        for k, v in net.state_dict().items():
            assert torch.equal(state[k], v), k
    assert health.measure(probe, nets.energy_net, nets.encoder, nets.generator) == first


# ---------------------------------------------------------------- inside training


def fit(cfg, stop_after_restart=False):
    """Trains `cfg` in process; returns (trainer state, error or None)."""
    from bidvl.engine import Trainer

    trainer = Trainer(cfg)
    if stop_after_restart:  # a SIGTERM right after the restart: checkpoint at the next step, exit
        original = trainer.check_health

        def check_then_stop(step, logs):
            restarted = original(step, logs)
            if restarted:
                trainer.stops.signal = signal.SIGTERM
            return restarted

        trainer.check_health = check_then_stop
    error = None
    try:
        trainer.fit()
    except health.UnhealthyRun as exc:
        error = exc
    finally:
        trainer.close(synchronise=False)
    return trainer.state, error


def without_train(records):
    return [{k: v for k, v in r.items() if k != "train"} for r in records]


def checkpoint_weights(run, step):
    from safetensors.torch import load_file

    folder = run / "checkpoints" / f"step_{step:08d}"
    return {f"{i}.{k}": v for i, name in enumerate(("model.safetensors", "model_1.safetensors", "model_2.safetensors"))
            for k, v in load_file(folder / name).items()}


def test_checks_write_lines_tags_card_and_api_and_change_no_weight(tmp_path, digits16, capsys):
    import bidvl
    from conftest import weights

    from test_trackers import tensorboard_tags

    checked = tiny_cfg(tmp_path / "a", digits16, "train.max_steps=6", "checkpoint.every=2", "health.every=2",
                       "health.warmup=4")
    fit(checked)
    plain = tiny_cfg(tmp_path / "b", digits16, "train.max_steps=6", "checkpoint.every=2", "health.every=0")
    fit(plain)
    run = tmp_path / "a" / "run"
    a, b = weights(run), weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # checks change nothing
    lines = health.read_records(run)
    assert [r["step"] for r in lines] == [2, 4, 6]
    for record in lines:
        assert record["verdict"] in health.VERDICTS and isinstance(record["reasons"], list)
        assert {"spread", "nn_ratio", "hf_ratio", "rmse", "energy_gap", *(f"auroc_{k}" for k in health.NOISE_KINDS)
                } <= set(record["figures"])
        assert "grad_norm/energy_net" in record["train"] and "loss/loss_ll" in record["train"]
    out = capsys.readouterr().out
    assert out.count("health step ") == 3 and f"health step 6: {lines[-1]['verdict']}" in out
    assert f"run health: {health.summary(lines[-1])}" in out
    scalars, _ = tensorboard_tags(run)
    assert scalars["health/spread"] == [2, 4, 6] and scalars["health/verdict"] == [2, 4, 6]
    assert "health/auroc_blurred" in scalars
    assert json.loads((run / "model" / "health.json").read_text()) == lines[-1]
    assert f"| run health | {health.summary(lines[-1])}" in (run / "model" / "README.md").read_text()
    model = bidvl.load(run / "model")
    assert model.health == lines[-1] and f"health {lines[-1]['verdict']}" in repr(model)
    at_4 = bidvl.load(run, checkpoint=4)
    assert at_4.health == lines[1]
    assert not (tmp_path / "b" / "run" / "health.jsonl").exists()
    assert "health not checked" in repr(bidvl.load(tmp_path / "b" / "run"))


def test_a_resumed_run_writes_the_lines_of_an_uninterrupted_one(tmp_path, digits16):
    import shutil

    args = ("health.every=2", "checkpoint.every=4", "health.warmup=0")
    fit(tiny_cfg(tmp_path / "a", digits16, "train.max_steps=8", *args))
    interrupted = tiny_cfg(tmp_path / "b", digits16, "train.max_steps=6", *args)
    fit(interrupted)
    run = tmp_path / "b" / "run"
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # killed after its check at 6, before its checkpoint
    fit(tiny_cfg(tmp_path / "b", digits16, "train.max_steps=8", *args))
    assert without_train(health.read_records(run)) == without_train(health.read_records(tmp_path / "a" / "run"))
    assert [r["step"] for r in health.read_records(run)] == [2, 4, 6, 8]


def test_stop_policy_checkpoints_and_names_the_reason(tmp_path, digits16):
    cfg = tiny_cfg(tmp_path, digits16, "train.max_steps=20", "health.every=2", "health.warmup=0",
                   "health.min_spread=1e9", "health.on_unhealthy=stop", "health.patience=2")
    state, error = fit(cfg)
    assert error is not None and state.step == 4
    assert "unhealthy for 2 checks in a row at step 4: samples collapsed" in str(error)
    assert "health.on_unhealthy=stop" in str(error)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004" / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "model").exists()


def test_restart_goes_back_to_the_newest_healthy_checkpoint_and_resumes_bit_exact(tmp_path, digits16):
    from bidvl.checkpoint import TrainState
    from bidvl.run_dir import complete_checkpoints
    from bidvl.health import restart_seed

    # Checks are healthy until the warm-up ends (step 4), then unhealthy: the second unhealthy
    # check (step 6) restarts from step 2 with new noise; the same happens again and, with
    # restarts used up, the run stops at step 6.
    args = ("train.max_steps=20", "health.every=2", "checkpoint.every=2", "health.warmup=4",
            "health.min_spread=1e9", "health.on_unhealthy=restart", "health.patience=2", "health.max_restarts=1")
    state, error = fit(tiny_cfg(tmp_path / "a", digits16, *args))
    run = tmp_path / "a" / "run"
    assert error is not None and "after 1 restarts: health.max_restarts=1" in str(error)
    assert state.step == 6 and state.restarts == 1 and state.noise_seed == restart_seed(0, 1)
    records = health.read_records(run)
    assert [(r["step"], r.get("event", r.get("verdict"))) for r in records] == [
        (2, "healthy"), (4, "unhealthy"), (6, "unhealthy"), (2, "restart"), (4, "unhealthy"), (6, "unhealthy")]
    assert records[3]["from_step"] == 6 and records[3]["noise_seed"] == state.noise_seed
    assert records[5]["reasons"][0].endswith("since step 4")  # the abandoned checks do not count
    restarted = TrainState.read(run / "checkpoints" / "step_00000002" / "train_state.json")
    assert restarted.restarts == 1 and restarted.health == "healthy"
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]

    # The same run, stopped by SIGTERM right after its restart and resumed, ends identically.
    b = tmp_path / "b"
    state_b, error_b = fit(tiny_cfg(b, digits16, *args), stop_after_restart=True)
    # The signal arrives while the loop waits for step 3's data: it stops at once, at the restart
    # point (already saved), instead of training one more step first.
    assert error_b is None and state_b.step == 2 and state_b.restarts == 1
    state_b, error_b = fit(tiny_cfg(b, digits16, *args))
    assert str(error_b) == str(error).replace(str(run), str(b / "run"))
    # Every check and verdict as uninterrupted ("train" holds the logging window's means: a window
    # cut by the resume averages fewer steps).
    assert without_train(health.read_records(b / "run")) == without_train(records)
    a_weights, b_weights = checkpoint_weights(run, 6), checkpoint_weights(b / "run", 6)
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)


def test_the_restart_noise_differs_from_the_first_attempt(tmp_path, digits16):
    from bidvl.health import restart_seed

    seeds = {restart_seed(0, k) for k in range(4)} | {restart_seed(1, k) for k in range(4)}
    assert len(seeds) == 8 and all(0 <= s < 2**31 - 2**16 for s in seeds)


def test_range_errors_say_what_is_expected(tmp_path):
    """(Every health key is in tests/test_config.py's tables; here, the words of the two-key checks.)"""
    with pytest.raises(ConfigError, match=r"^health.warn_auroc=0.3: expected >= health.min_auroc=0.6 "):
        load_config(None, [f"run.dir={tmp_path}", "health.min_auroc=0.6", "health.warn_auroc=0.3"])
    with pytest.raises(ConfigError, match=r"^checkpoint.every=500: with health.on_unhealthy=restart it must "
                                          r"be a multiple of health.every=300 "):
        load_config(None, [f"run.dir={tmp_path}", "health.every=300", "health.on_unhealthy=restart"])


def test_without_a_test_split_the_probe_takes_training_images_and_says_so(tmp_path, digits16, capsys):
    import shutil

    from bidvl.data.meta import read_meta, write_meta

    only_train = tmp_path / "only_train"
    shutil.copytree(digits16, only_train)
    meta = read_meta(only_train)
    meta["splits"] = {"train": meta["splits"]["train"]}
    write_meta(only_train, meta)
    probe = health.Probe.from_config(tiny_cfg(tmp_path, only_train, "health.num_images=16"))
    assert torch.equal(probe.data, split_images(digits16, "train")[:16])
    assert "no split 'test'" in capsys.readouterr().err
    with pytest.raises(health.ShardError, match="no split 'test'"):  # a data.test the user named must work
        health.Probe.from_config(tiny_cfg(tmp_path, only_train, f"data.test={only_train}"))
    # Nothing readable to probe with at all: the run trains without checks and says so.
    from bidvl.engine import Trainer

    (only_train / meta["splits"]["train"]["shards"][0]["name"]).write_bytes(b"not a tar")
    trainer = Trainer(tiny_cfg(tmp_path, only_train, "health.every=2"))
    monitor = health.HealthMonitor(trainer.accelerator, trainer.cfg, trainer.objective)
    trainer.close()
    assert not monitor.enabled and monitor.probe is None
    assert "warning: health checks are off for this run: no images to probe with" in capsys.readouterr().out


def test_a_probe_needs_held_out_images(tmp_path, digits16):
    cfg = tiny_cfg(tmp_path, digits16, "data.test_split=train", "health.num_images=8")
    assert len(health.Probe.from_config(cfg).data) == 8
    assert math.isfinite(health.Probe.from_config(cfg).data_spread)


@pytest.mark.slow
def test_the_stop_policy_from_the_command_line_is_one_error_line_and_exit_2(tmp_path, digits16):
    """As users run it, output to a file: the checks' lines, then one `error:` line, exit 2."""
    import subprocess
    import sys

    from conftest import ENV

    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={tmp_path / 'run'}",
                               f"data.train={digits16}", "train.max_steps=50", "health.every=2",
                               "health.warmup=0", "health.min_spread=1e9", "health.on_unhealthy=stop"],
                              env=ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 2, text[-3000:]
    assert "health step 2: unhealthy - samples collapsed" in text and "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: run unhealthy for 2 checks in a row at step 4: "
                                                     "samples collapsed")
    assert [r["step"] for r in health.read_records(tmp_path / "run")] == [2, 4]
