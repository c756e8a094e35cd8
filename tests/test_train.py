"""The training engine, in process (phases, guards, configs) and end to end (1 and 2 CPU processes)."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import BIN, REPO, TINY
from bidvl.config import ConfigError, load_config
from bidvl.data.meta import shard_name, write_meta
from bidvl.data import ShardStream
from bidvl.tracking import StepResult





def random_shards(folder: Path, resolution: int, channels: int, count: int = 4) -> Path:
    """A minimal shards folder of random images (for configs whose datasets are not here)."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = {1: "L", 3: "RGB"}[channels]
    rng = np.random.default_rng(0)
    with tarfile.open(folder / shard_name("train", 0), "w") as tar:
        for i in range(count):
            shape = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "PNG")
            info = tarfile.TarInfo(f"r{i:03d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    write_meta(folder, {"source": "random", "resolution": resolution, "channels": channels,
                        "num_classes": None, "options": {},
                        "splits": {"train": {"count": count, "shards": [
                            {"name": shard_name("train", 0), "count": count}]}}})
    return folder


def make_trainer(tmp_path, shards, *overrides):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml",
                      [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={shards}", *overrides])
    return Trainer(cfg)


def snapshot(net):
    return [p.detach().clone() for p in net.parameters()]


def changed(before, net):
    return any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_each_phase_moves_only_its_nets(tmp_path, digits16):
    trainer = make_trainer(tmp_path, digits16)
    v = torch.rand(16, 1, 16, 16) * 2 - 1
    h = [torch.randn(16, 8)]
    e, q, g = snapshot(trainer.energy_net), snapshot(trainer.encoder), snapshot(trainer.generator)
    trainer.upper_level_step([v], h, StepResult())
    assert changed(e, trainer.energy_net)
    assert not changed(q, trainer.encoder) and not changed(g, trainer.generator)
    e = snapshot(trainer.energy_net)
    trainer.lower_level_step([v], h, StepResult())
    assert not changed(e, trainer.energy_net)
    assert changed(q, trainer.encoder) and changed(g, trainer.generator)
    # No stale gradients are left behind on any net.
    for net in (trainer.energy_net, trainer.encoder, trainer.generator):
        assert all(p.grad is None for p in net.parameters())
    trainer.close()


def test_not_offset_upper_level_also_moves_encoder(tmp_path, digits16):
    trainer = make_trainer(tmp_path, digits16, "objective.latent_term=not_offset")
    v, h = torch.rand(16, 1, 16, 16) * 2 - 1, [torch.randn(16, 8)]
    q, g = snapshot(trainer.encoder), snapshot(trainer.generator)
    trainer.upper_level_step([v], h, StepResult())
    assert changed(q, trainer.encoder) and not changed(g, trainer.generator)
    trainer.close()


def test_nonfinite_step_is_skipped_and_counted(tmp_path, digits16):
    trainer = make_trainer(tmp_path, digits16)
    v = torch.full((16, 1, 16, 16), float("nan"))
    e, q = snapshot(trainer.energy_net), snapshot(trainer.encoder)
    metrics = trainer.train_step([v])
    assert trainer.state.skipped_steps == 0  # counted on the device, read at a sync step
    assert not trainer.apply_nonfinite_policy()  # (patience 10: no action)
    assert trainer.state.skipped_steps == 2 and trainer.state.skipped_in_a_row == 1  # upper and lower step
    assert not changed(e, trainer.energy_net) and not changed(q, trainer.encoder)
    assert not torch.isfinite(metrics["grad_norm/energy_net"])
    trainer.train_step([torch.rand(16, 1, 16, 16)])
    assert trainer.state.skipped_steps == 2 and changed(e, trainer.energy_net)
    trainer.save_checkpoint()  # a checkpoint reads the counts into the state it saves
    assert trainer.state.skipped_steps == 2 and trainer.state.skipped_in_a_row == 0
    trainer.close()


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_limits_the_norm_the_optimizer_sees(tmp_path, digits16, clip):
    """train.grad_clip=c: the optimizer steps with gradients of norm <= c, and grad_norm/* logs the
    norm before clipping; 0 (the default) only measures it."""
    trainer = make_trainer(tmp_path, digits16, f"train.grad_clip={clip}")
    seen = {}
    for name, opt in (("energy_net", trainer.energy_opt), ("encoder_generator", trainer.latent_opt)):
        step = opt.step

        def recording(*args, _name=name, _opt=opt, _step=step, **kwargs):
            grads = [p.grad for group in _opt.param_groups for p in group["params"] if p.grad is not None]
            seen[_name] = float(torch.nn.utils.get_total_norm(grads))
            return _step(*args, **kwargs)

        opt.step = recording
    metrics = trainer.train_step([torch.rand(16, 1, 16, 16) * 2 - 1])
    for name, norm in seen.items():
        logged = float(metrics[f"grad_norm/{name}"])
        if clip:
            assert logged > 10 * clip and norm == pytest.approx(clip, rel=1e-3)
        else:
            assert norm == pytest.approx(logged, rel=1e-6) and norm > 0
    assert set(seen) == {"energy_net", "encoder_generator"}
    trainer.close()


def test_gradient_accumulation_equals_the_joint_batch(tmp_path, digits16):
    """Two micro-batches of 8 with accumulation == one batch of 16. Nets in eval mode, so that
    neither BatchNorm statistics (generator) nor the spectral-norm power iteration, which runs once
    per forward (energy net), depend on the split."""
    a = make_trainer(tmp_path / "a", digits16, "train.grad_accum=2")
    b = make_trainer(tmp_path / "b", digits16)
    v = torch.rand(16, 1, 16, 16) * 2 - 1
    h = torch.randn(16, 8)
    for t in (a, b):
        t.generator.eval()
        t.energy_net.eval()
    metrics_a, metrics_b = StepResult(), StepResult()
    a.upper_level_step([v[:8], v[8:]], [h[:8], h[8:]], metrics_a)
    b.upper_level_step([v], [h], metrics_b)
    torch.testing.assert_close(metrics_a["grad_norm/energy_net"], metrics_b["grad_norm/energy_net"])
    for x, y in zip(a.energy_net.parameters(), b.energy_net.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    a.close()
    b.close()


@pytest.mark.parametrize("option", ["train.channels_last=true"])
def test_speed_options_do_not_change_results_beyond_precision(tmp_path, digits16, option):
    plain = make_trainer(tmp_path / "a", digits16)
    fast = make_trainer(tmp_path / "b", digits16, option)
    torch.manual_seed(5)
    v = torch.rand(16, 1, 16, 16) * 2 - 1
    for t in (plain, fast):
        torch.manual_seed(6)  # same h_p and eps in both
        t.train_step([v])
    for a, b in zip(plain.energy_net.parameters(), fast.energy_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(plain.generator.parameters(), fast.generator.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    plain.close()
    fast.close()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_loads_builds_and_steps(tmp_path, name):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs" / name)
    shards = random_shards(tmp_path / "shards", cfg.data.resolution, cfg.data.channels)
    cfg = load_config(REPO / "configs" / name, [
        f"run.dir={tmp_path / 'run'}", f"data.train={shards}", "data.auto_build=''",
        "train.batch_size=2", "data.num_workers=0",
    ])
    trainer = Trainer(cfg)
    v = torch.rand(2, cfg.data.channels, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    metrics = trainer.train_step([v])
    lower = ["loss/loss_ll"] if len(trainer.objective.lower_level_phases) == 1 else [
        "loss/loss_" + "_".join(phase) for phase in trainer.objective.lower_level_phases]  # triangle
    for key in ["loss/loss_ul", *lower]:
        assert torch.isfinite(metrics[key]), key
    assert trainer.state.skipped_steps == 0
    trainer.close()


def test_config_errors_name_the_key(tmp_path, digits16):
    with pytest.raises(ConfigError, match="train.bogus"):
        load_config(REPO / "configs/digits.yaml", ["train.bogus=1"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(REPO / "configs/digits.yaml", ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="objective.latent_term='sideways'"):
        load_config(REPO / "configs/digits.yaml", ["objective.latent_term=sideways"])
    with pytest.raises(ConfigError, match="train.max_steps=0"):
        load_config(REPO / "configs/digits.yaml", ["train.max_steps=0"])
    trainer = make_trainer(tmp_path, digits16, "data.resolution=32")
    with pytest.raises(ConfigError, match=r"data.resolution=32 but .*meta.json says resolution=16"):
        trainer.fit()  # before any step
    assert trainer.state.step == 0
    trainer.close(synchronise=False)


# ------------------------------------------------------------------ end to end (subprocesses)


def run_train(args, env_extra=None, processes=1, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", "0", str(REPO / "launch/train.py"), *args]
    else:
        cmd = [sys.executable, str(REPO / "launch/train.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def tiny_args(run_dir, shards, steps, *extra):
    return [*TINY, f"run.dir={run_dir}", f"data.train={shards}", f"train.max_steps={steps}", *extra]


def event_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = {p.parent for p in Path(run_dir, "tensorboard").rglob("events.out.tfevents.*")}
    scalars, images = set(), set()
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


@pytest.mark.slow
def test_two_process_run_keeps_replicas_identical(tmp_path, digits16):
    run = tmp_path / "run"
    proc = run_train(tiny_args(run, digits16, 4, "checkpoint.every=2", "health.every=2"), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Health: one line per check (not one per rank), and the figures are those one process
    # measures on the same weights: the same on every number of processes.
    from bidvl import health

    records = health.read_records(run)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        step, figures = health.replay(run, record["step"])
        assert step == record["step"] and figures == pytest.approx(record["figures"], rel=1e-6, abs=1e-9)
    assert proc.stdout.count("health step 4:") == 1 and "run health: " in proc.stdout
    for ckpt in ("step_00000002", "step_00000004"):
        digests = __import__("json").loads((run / "checkpoints" / ckpt / "replicas.json").read_text())
        assert len(digests["sha256"]) == 2 and len(set(digests["sha256"])) == 1
    scalars, images = event_tags(run)
    for tag in ("loss/loss_ul", "loss/loss_ll", "loss/recon", "loss/kl", "loss/energy_term",
                "loss/latent_term", "energy/data", "energy/samples", "energy/gap",
                "grad_norm/energy_net", "grad_norm/encoder_generator", "lr/energy_net",
                "perf/images_per_sec", "perf/step_ms", "perf/data_wait_fraction", "train/skipped_steps",
                "health/spread", "health/auroc_uniform", "health/verdict"):
        assert tag in scalars, tag
    assert {"samples", "reconstructions"} <= images
    for name in ("energy", "encoder", "generator"):
        assert (run / "model" / f"{name}.safetensors").is_file()
    assert (run / "model" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_ema_and_periodic_eval(tmp_path, digits16, precision):
    run = tmp_path / "run"
    p = run_train(tiny_args(run, digits16, 4, f"train.mixed_precision={precision}", "train.ema=0.9",
                            "eval.every=2", "eval.metrics=rmse,ood", "eval.max_test=64"))
    assert p.returncode == 0, p.stderr[-3000:]
    scalars, _ = event_tags(run)
    assert {"eval/rmse", "eval/auroc_uniform", "loss/loss_ll"} <= scalars
    ema, gen = load_file(run / "model/generator_ema.safetensors"), load_file(run / "model/generator.safetensors")
    assert ema.keys() == gen.keys()
    assert any(not torch.equal(ema[k], gen[k]) for k in ema if ema[k].is_floating_point())
    for t in gen.values():
        assert torch.isfinite(t.float()).all()


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_weights(tmp_path, digits16):
    # batch 16 on 1437 images: 90 steps an epoch; start the check across LR decay with lr_decay<1.
    extra = ["checkpoint.every=3", "train.energy_optim.lr_decay=0.5", "train.latent_optim.lr_decay=0.5",
             "data.shuffle_buffer=50"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    p = run_train(tiny_args(whole, digits16, 6, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_train(tiny_args(parts, digits16, 3, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_train(tiny_args(parts, digits16, 6, *extra))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    for name in ("energy", "encoder", "generator"):
        a, b = load_file(whole / "model" / f"{name}.safetensors"), load_file(parts / "model" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"


@pytest.mark.slow
def test_no_arguments_from_a_fresh_clone(tmp_path):
    """`accelerate launch launch/train.py` in a fresh checkout builds the digits shards and trains;
    SIGTERM makes it checkpoint and exit."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    for path in ("launch", "bidvl/configs", "accelerate_config.yaml"):  # the working tree's version
        src, dst = REPO / path, clone / path
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(BIN / "accelerate"), "launch", "launch/train.py"], cwd=clone, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    events = clone / "runs/digits/tensorboard"
    deadline = time.time() + 240
    while time.time() < deadline and not list(events.rglob("events.out.tfevents.*")):
        time.sleep(1)
    time.sleep(5)  # a few steps
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    deadline = time.time() + 120
    checkpoints = clone / "runs/digits/checkpoints"
    while time.time() < deadline and not list(checkpoints.glob("step_*/COMPLETE")):
        time.sleep(1)
    assert (clone / "shards/digits/meta.json").is_file(), out[-3000:]
    assert list(checkpoints.glob("step_*/COMPLETE")), out[-3000:]
    # A pipe, not a terminal: plain lines, and the closing lines say how to go on.
    assert "\r" not in out, out[-3000:]
    assert "training stopped by signal 15 at step " in out and "the same command resumes the run" in out, out[-3000:]


def test_vae_baseline_trains_encoder_and_generator_only(tmp_path, digits16):
    trainer = make_trainer(tmp_path, digits16, "objective.name=vae")
    e, q, g = snapshot(trainer.energy_net), snapshot(trainer.encoder), snapshot(trainer.generator)
    metrics = trainer.train_step([torch.rand(16, 1, 16, 16) * 2 - 1])
    assert not changed(e, trainer.energy_net)
    assert changed(q, trainer.encoder) and changed(g, trainer.generator)
    assert "grad_norm/energy_net" not in metrics and "loss/loss_ll" in metrics
    trainer.close()


def test_divergence_triangle_baseline_phases(tmp_path, digits16):
    trainer = make_trainer(tmp_path, digits16, "objective.name=divergence_triangle", "objective.w_latent=0.1")
    v, h = torch.rand(16, 1, 16, 16) * 2 - 1, [torch.randn(16, 8)]
    e, q, g = snapshot(trainer.energy_net), snapshot(trainer.encoder), snapshot(trainer.generator)
    trainer.upper_level_step([v], h, StepResult())
    assert changed(e, trainer.energy_net) and not changed(q, trainer.encoder) and not changed(g, trainer.generator)
    e = snapshot(trainer.energy_net)
    metrics = StepResult()
    trainer.lower_level_step([v], h, metrics)
    assert not changed(e, trainer.energy_net)
    assert changed(q, trainer.encoder) and changed(g, trainer.generator)
    assert metrics["loss/latent_term"] > 0  # the latent NLL is reported as the latent term
    trainer.close()


@pytest.mark.slow
def test_time_budget_stops_exports_and_survives_resume(tmp_path, digits16):
    run = tmp_path / "run"
    # 0.002 min = 0.12 s of training: a handful of tiny steps, far below max_steps.
    p = run_train(tiny_args(run, digits16, 10_000, "train.time_budget_min=0.002",
                            "train.budget_clock=process", "checkpoint.every=100000"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "time budget" in p.stdout + p.stderr
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and (run / "model/generator.safetensors").is_file()
    import json

    state = json.loads((ckpts[0] / "train_state.json").read_text())
    assert 0 < state["step"] < 10_000 and state["budget_used_s"] >= 0.12
    # Running again resumes after the end of the budget: no further step, the export stays.
    p = run_train(tiny_args(run, digits16, 10_000, "train.time_budget_min=0.002",
                            "train.budget_clock=process", "checkpoint.every=100000"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted((run / "checkpoints").glob("step_*")) == ckpts
    assert load_file(run / "model/generator.safetensors").keys()


@pytest.mark.parametrize("sleep", [0.0, 0.3])
def test_fit_logs_the_time_spent_waiting_for_data(tmp_path, digits16, sleep):
    """perf/data_wait_fraction: the share of the wall time blocked on the data stream. A stream
    that sleeps 0.3 s before each batch must show it (the tiny step takes a few hundredths of a
    second); the plain stream of tiny digits must not (0.07 seen)."""
    import time

    trainer = make_trainer(tmp_path, digits16, "train.max_steps=4", "log.every=2", "log.images_every=1000",
                           "checkpoint.every=1000")
    shards = ShardStream(trainer.cfg, trainer.accelerator)

    class Slowed:  # the data seam fit() takes: batches_per_epoch and open(start_batch)
        batches_per_epoch = shards.batches_per_epoch

        def open(self, start_batch):
            for item in shards.open(start_batch):
                time.sleep(sleep)
                yield item

    logs = trainer.fit(Slowed())
    trainer.close()
    if sleep:
        assert 0.5 < logs["perf/data_wait_fraction"] <= 1.0
        assert logs["perf/step_ms"] >= 1e3 * sleep
    else:
        assert 0.0 <= logs["perf/data_wait_fraction"] < 0.5


@pytest.mark.parametrize("objective", [
    ["objective.name=bidvl"], ["objective.latent_term=not_offset", "objective.ratio_bias=sigmoid"],
    ["objective.name=vae"], ["objective.name=divergence_triangle"], ["objective.order=lower_first"],
])
def test_benchmark_plain_loop_runs_the_engine_objective(tmp_path, digits16, objective):
    """tools/benchmark.py's plain loop calls the same objective object as the engine: from the
    same weights, batch and noise, one step of each gives the same weights (the plain loop once
    ignored objective.name)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from benchmark import build_plain, plain_step
    finally:
        sys.path.pop(0)
    from contextlib import nullcontext

    from accelerate.utils import set_seed

    trainer = make_trainer(tmp_path, digits16, *objective)
    cfg = trainer.cfg
    set_seed(cfg.run.seed)  # as Trainer builds its nets
    nets, opts = build_plain(cfg, "cpu")
    for mine, theirs in zip(nets, (trainer.energy_net, trainer.encoder, trainer.generator)):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.equal(a, b)
    initial_energy = snapshot(nets[0])
    v = torch.rand(16, 1, 16, 16) * 2 - 1
    torch.manual_seed(7)
    trainer.train_step([v])
    torch.manual_seed(7)
    plain_step(nets, opts, v, cfg, nullcontext)
    for mine, theirs in zip(nets, (trainer.energy_net, trainer.encoder, trainer.generator)):
        for a, b in zip(mine.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert changed(initial_energy, nets[0]) == (cfg.objective.name != "vae")
    trainer.close()


# ------------------------------------------------------------------ what users of Accelerate expect


def test_precision_follows_the_launcher_unless_the_config_says(tmp_path, monkeypatch):
    from bidvl.config import resolve_precision

    cfg = load_config(REPO / "configs/digits.yaml")
    assert cfg.train.mixed_precision == "auto"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision(cfg) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert resolve_precision(cfg) == "bf16"
    cfg.train.mixed_precision = "no"
    with pytest.warns(UserWarning, match="launcher asks for mixed_precision=bf16 .*an explicit value wins"):
        assert resolve_precision(cfg) == "no"


@pytest.mark.process
def test_launcher_bf16_trains_in_bf16_and_records_it(tmp_path, digits16):
    """`accelerate launch --mixed_precision bf16 launch/train.py` once trained in fp32."""
    run = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--mixed_precision", "bf16",
           "--main_process_port", "0", str(REPO / "launch/train.py"), *tiny_args(run, digits16, 2)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    p = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert load_config(run / "config.yaml").train.mixed_precision == "bf16"


@pytest.mark.process
def test_print_config_prints_the_resolved_yaml_and_writes_nothing(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--print-config", "train.max_steps=7",
                        f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    import yaml

    printed = yaml.safe_load(p.stdout)
    assert printed["train"]["max_steps"] == 7 and printed["run"]["dir"] == str(tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
    help_text = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for section in ("run", "data", "model", "objective", "train", "checkpoint", "log", "eval"):
        assert f"\n  {section} " in help_text


@pytest.mark.process
def test_resume_prints_changed_keys_and_refuses_changed_maths(tmp_path, digits16):
    run = tmp_path / "run"
    assert run_train(tiny_args(run, digits16, 2, "checkpoint.every=2")).returncode == 0
    p = run_train(tiny_args(run, digits16, 4, "checkpoint.every=2", "objective.r_basic=0.5"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "objective.r_basic=0.05, this config has objective.r_basic=0.5" in p.stderr
    assert "checkpoint.allow_changes=true" in p.stderr
    assert load_config(run / "config.yaml").objective.r_basic == 0.05  # the refused run wrote nothing
    p = run_train(tiny_args(run, digits16, 4, "checkpoint.every=2", "objective.r_basic=0.5",
                            "checkpoint.allow_changes=true", "log.every=1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "with a changed config:" in p.stderr
    for line in ("train.max_steps: 2 -> 4", "objective.r_basic: 0.05 -> 0.5", "log.every: 2 -> 1"):
        assert line in p.stderr
    assert load_config(run / "config.yaml").objective.r_basic == 0.5


@pytest.mark.process
def test_resume_on_another_number_of_processes_says_what_changes(tmp_path, digits16):
    run = tmp_path / "run"
    assert run_train(tiny_args(run, digits16, 2, "checkpoint.every=2")).returncode == 0
    p = run_train(tiny_args(run, digits16, 4, "checkpoint.every=2"), processes=2)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "was trained on 1 processes, this run has 2" in p.stderr
    assert "data order changes" in p.stderr and "epoch length" in p.stderr


@pytest.mark.process
def test_export_writes_a_model_card_with_samples(tmp_path, digits16):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "step_00000001.md").write_text("| metric | value |\n|---|---|\n| rmse | 0.25 |\n")
    p = run_train(tiny_args(run, digits16, 3, "train.ema=0.9", "checkpoint.every=3"))
    assert p.returncode == 0, p.stderr[-2000:]
    card = (run / "model" / "README.md").read_text()
    for text in ("| steps | 3 (max_steps 3) |", "| images seen | 48 (steps x batch 16 x grad_accum 1 x 1 processes) |",
                 "| generator EMA | decay 0.9", "| precision | no |", "| rmse | 0.25 |", "![64 samples](samples.png)",
                 f'bidvl.load("{run / "model"}")', "from the EMA generator"):
        assert text in card, text
    from PIL import Image

    grid = Image.open(run / "model" / "samples.png")
    assert grid.size == (8 * 16 + 9 * 2, 8 * 16 + 9 * 2)  # 8 x 8 samples of 16 px, 2 px padding


def test_the_learning_rates_decay_once_per_epoch_through_fit_and_resume(tmp_path, digits16):
    """lr = base_lr x lr_decay ** (step // steps_per_epoch) at every step fit() takes, for both
    optimizers and every parameter group (the encoder's own with train.encoder_weight_decay),
    and after a resume mid-epoch. steps_per_epoch = ceil(batches_per_epoch / grad_accum) = 3."""
    overrides = ["train.energy_optim.lr_decay=0.5", "train.latent_optim.lr_decay=0.8", "train.grad_accum=2",
                 "train.encoder_weight_decay=0", "checkpoint.every=1000", "log.every=1000",
                 "log.images_every=1000"]

    class Random:  # 6 micro-batches per epoch
        batches_per_epoch = 6

        def open(self, start_batch):
            generator = torch.Generator().manual_seed(start_batch)
            while True:
                yield torch.rand(16, 1, 16, 16, generator=generator) * 2 - 1, None, 0

    def rates(max_steps):
        trainer = make_trainer(tmp_path, digits16, f"train.max_steps={max_steps}", *overrides)
        seen, step = [], trainer.train_step

        def spy(batches, latents=None):
            seen.append((trainer.state.step, [g["lr"] for g in trainer.energy_opt.param_groups],
                         [g["lr"] for g in trainer.latent_opt.param_groups]))
            return step(batches, latents)

        trainer.train_step = spy
        trainer.fit(Random())
        base = trainer.cfg.train
        trainer.close()
        return seen, base

    seen, base = rates(8)
    assert [s for s, _, _ in seen] == list(range(8))
    for s, energy, latent in seen:
        assert energy == [pytest.approx(base.energy_optim.lr * 0.5 ** (s // 3))]
        assert latent == [pytest.approx(base.latent_optim.lr * 0.8 ** (s // 3))] * 2  # encoder, generator
    resumed, _ = rates(11)  # from the final checkpoint at step 8 (epoch 2, mid-epoch)
    assert [s for s, _, _ in resumed] == [8, 9, 10]
    for s, energy, latent in resumed:
        assert energy == [pytest.approx(base.energy_optim.lr * 0.5 ** (s // 3))]
        assert latent == [pytest.approx(base.latent_optim.lr * 0.8 ** (s // 3))] * 2


@pytest.mark.parametrize("objective", ["bidvl", "not_offset", "divergence_triangle"])
def test_a_step_reports_every_term_and_moves_the_ema(tmp_path, digits16, objective):
    """What a step logs (the names TensorBoard shows) and the EMA update after the lower level:
    ema = decay x ema + (1 - decay) x generator, once per step."""
    name = "bidvl" if objective == "not_offset" else objective
    latent = "not_offset" if objective == "not_offset" else "offset"
    trainer = make_trainer(tmp_path, digits16, f"objective.name={name}", f"objective.latent_term={latent}",
                           "train.ema=0.5")
    generator = trainer.unwrapped["generator"]
    before = [p.detach().clone() for p in trainer.ema.module.parameters()]
    assert all(torch.equal(a, p) for a, p in zip(before, generator.parameters()))
    result = trainer.train_step([torch.rand(16, 1, 16, 16) * 2 - 1])
    losses = {k for k in result.sums if k.startswith("loss/")}
    norms = {k for k in result.sums if k.startswith("grad_norm/")}
    if name == "bidvl":
        assert losses == {"loss/loss_ul", "loss/loss_ll", "loss/recon", "loss/kl", "loss/energy_term",
                          "loss/latent_term", "loss/ratio", "loss/weighted_vae"}
        assert norms == {"grad_norm/energy_net", "grad_norm/encoder_generator"} | (
            {"grad_norm/encoder_ul"} if latent == "not_offset" else set())
    else:  # one loss per phase: the encoder's, then the generator's
        assert losses == {"loss/loss_ul", "loss/loss_encoder", "loss/loss_generator", "loss/recon", "loss/kl",
                          "loss/energy_term", "loss/latent_term", "loss/weighted_vae"}
        assert norms == {"grad_norm/energy_net", "grad_norm/encoder", "grad_norm/generator"}
    assert {"energy/data", "energy/samples"} <= set(result.sums)
    for ema, start, now in zip(trainer.ema.module.parameters(), before, generator.parameters()):
        torch.testing.assert_close(ema, 0.5 * start + 0.5 * now.detach())
    assert any(not torch.equal(a, p) for a, p in zip(before, generator.parameters()))
    trainer.close()


def test_the_optimizers_take_every_setting_from_the_config(tmp_path, digits16):
    """Adam's betas and weight decay (torch's defaults differ: (0.9, 0.999), 0), per net: the
    encoder has its own group when train.encoder_weight_decay is set."""
    trainer = make_trainer(tmp_path, digits16, "train.energy_optim.betas=[0.1,0.9]", "train.energy_optim.weight_decay=0.01",
                           "train.latent_optim.betas=[0.2,0.8]", "train.latent_optim.weight_decay=0.02",
                           "train.encoder_weight_decay=0.03")
    [energy] = trainer.energy_opt.param_groups
    assert (energy["betas"], energy["weight_decay"]) == ((0.1, 0.9), 0.01)
    groups = trainer.latent_opt.param_groups
    assert [(g["betas"], g["weight_decay"]) for g in groups] == [((0.2, 0.8), 0.03), ((0.2, 0.8), 0.02)]
    assert [p for g in groups for p in g["params"]] == [*trainer.encoder.parameters(), *trainer.generator.parameters()]
    trainer.close()


def test_a_nonfinite_gradient_in_one_optimizer_step_marks_the_whole_step(tmp_path, digits16):
    """An upper-level skip is not undone by a finite lower-level step after it."""
    from bidvl.tracking import StepResult

    trainer = make_trainer(tmp_path, digits16)
    result = StepResult()
    for p in trainer.energy_net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    trainer._optimizer_step(trainer.energy_opt, list(trainer.energy_net.parameters()), "energy_net", result)
    assert result.nonfinite
    params = [*trainer.encoder.parameters(), *trainer.generator.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    trainer._optimizer_step(trainer.latent_opt, params, "encoder_generator", result)
    assert result.nonfinite and result.skipped == 1
    trainer.close()


@pytest.mark.process
def test_a_log_file_gets_plain_lines_and_a_closing_summary(tmp_path, digits16):
    """Run as a cluster job runs it (stdout and stderr into one file, no terminal): no carriage
    returns, one line per log window (step/total, speed, ETA, losses, the health verdict), and
    closing lines saying how the run ended and where the model is, by a path that loads."""
    import bidvl

    run, log = tmp_path / "run", tmp_path / "slurm-1.out"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"),
                               *tiny_args(run, digits16, 6, "health.every=2", "health.num_images=16")],
                              stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              cwd=tmp_path, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/6", "4/6", "6/6"], text[-3000:]
    for line in lines:
        assert " img/s, " in line and " ms/step | " in line and ", ETA " in line and " gap " in line, line
        assert " recon " in line, line
    assert "health: " not in lines[0] and "| health: " in lines[1], lines  # the check at step 2 comes after its log line
    assert "training finished at step 6 after " in text
    assert "final: " in text and "loss/recon " in text.split("final: ", 1)[1].splitlines()[0]
    model = text.split("model: ", 1)[1].split(" (model card: ")[0]
    assert Path(model) == (run / "model").resolve()
    assert bidvl.load(model).sample(2).shape[0] == 2


def test_the_progress_line_counts_down_the_budget_it_runs_on(tmp_path, digits16, capsys):
    """`lines`: the ETA is the steps left at the window's rate, or the wall-clock budget's end when
    sooner; a process-clock budget is shown beside it, in CPU time."""
    from types import SimpleNamespace

    from bidvl.tracking import Progress, duration

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, "log.progress=lines", "train.max_steps=1000",
                                                     "train.time_budget_min=10", "train.budget_clock=wall"])
    progress = Progress(SimpleNamespace(is_main_process=True), cfg, start=0)
    logs = {"perf/step_ms": 1000.0, "perf/images_per_sec": 16.0, "loss/recon": 1.5}
    progress.logged(100, logs, "warning", budget_used_s=300.0)  # steps: 900 s left; budget: 300 s
    progress.logged(900, logs, "", budget_used_s=300.0)  # steps: 100 s left
    cfg.train.budget_clock = "process"
    progress.logged(100, logs, "", budget_used_s=300.0)
    first, second, third = capsys.readouterr().out.splitlines()
    assert first.startswith("step 100/1000 (10.0%) | 16 img/s, 1000 ms/step | ") and first.endswith(
        ", ETA 5m00s | recon 1.5 | health: warning"), first
    assert ", ETA 1m40s | recon 1.5" in second and "health" not in second, second
    assert ", ETA 15m00s, budget 5m00s of 10m00s left (process clock) | " in third, third
    assert [duration(s) for s in (4, 185, 7620, 273600)] == ["4s", "3m05s", "2h07m", "3d04h"]
    Progress(SimpleNamespace(is_main_process=False), cfg, start=0).logged(100, logs)  # other ranks: silent
    assert capsys.readouterr().out == ""


@pytest.mark.process
def test_an_ema_turned_on_at_resume_starts_from_the_loaded_generator(tmp_path, digits16):
    """A run saved without an EMA resumes with train.ema on (the EMA starts from the checkpoint's
    generator, said once) instead of calling every checkpoint damaged; with train.ema_warmup the
    first update averages with decay 0.1, and the update count goes on across the next resume."""
    import bidvl

    run = tmp_path / "run"
    p = run_train(tiny_args(run, digits16, 4, "checkpoint.every=4"))
    assert p.returncode == 0, p.stderr[-3000:]
    on = ("train.ema=0.9", "train.ema_warmup=true", "checkpoint.every=1")
    p = run_train(tiny_args(run, digits16, 5, *on))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "saved without an EMA (train.ema=0): the generator's EMA starts from its weights at step 4" in p.stderr
    assert "damaged" not in p.stdout + p.stderr

    def generator(ema, checkpoint):
        return {k: t.clone() for k, t in bidvl.load(run, ema=ema, checkpoint=checkpoint).generator.state_dict().items()}

    def buffer(key):
        return "running_" in key or "num_batches_tracked" in key

    def check(ema, before, after, decay):
        for k, t in ema.items():
            expected = after[k] if buffer(k) else decay * before[k] + (1 - decay) * after[k]
            torch.testing.assert_close(t, expected, msg=k)

    g4, g5, ema5 = generator(False, 4), generator(False, 5), generator(True, 5)
    check(ema5, g4, g5, 0.1)  # decay_at(0) = 1/10: not 0.9 (no warm-up), not from the initial weights
    p = run_train(tiny_args(run, digits16, 6, *on))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "saved without an EMA" not in p.stderr
    check(generator(True, 6), ema5, generator(False, 6), 2 / 11)  # the second update: decay_at(1)


def test_fit_logs_the_flops_of_a_step_and_the_mfu_against_the_peak(tmp_path, digits16, capsys):
    """perf/tflops from the first step's FLOPs (torch's FlopCounterMode) over the window's time;
    perf/mfu against log.peak_tflops (or the GPU table); counting leaves the step bit-identical."""
    import torch

    from bidvl.tracking import PEAK_TFLOPS, counting_flops, peak_tflops

    peak = 1e-3
    trainer = make_trainer(tmp_path, digits16, "train.max_steps=4", "log.every=2", "log.images_every=1000",
                           "checkpoint.every=1000", f"log.peak_tflops={peak}", "log.progress=lines")
    logs = trainer.fit()
    trainer.close()
    assert logs["perf/tflops"] > 0 and logs["perf/mfu"] == pytest.approx(logs["perf/tflops"] / peak)
    assert f"MFU {100 * logs['perf/mfu']:.1f}%" in capsys.readouterr().out
    # The count is a step's matmul/conv FLOPs, the same each time; the step is unchanged by it.
    a = make_trainer(tmp_path / "a", digits16)
    b = make_trainer(tmp_path / "b", digits16)
    batch = next(iter(ShardStream(a.cfg, a.accelerator).open(0)))[0]
    torch.manual_seed(5)
    _, flops = counting_flops(lambda: a.train_step([batch]))
    torch.manual_seed(5)
    b.train_step([batch])
    torch.manual_seed(6)
    assert counting_flops(lambda: a.train_step([batch]))[1] == flops > 0
    torch.manual_seed(6)
    b.train_step([batch])
    for net in ("energy_net", "encoder", "generator"):
        for (name, x), (_, y) in zip(getattr(a, net).state_dict().items(), getattr(b, net).state_dict().items()):
            assert torch.equal(x, y), (net, name)
    a.close()
    b.close()
    # Without a peak, on the CPU: no MFU (perf/tflops still); the table names GPUs it knows.
    assert peak_tflops(load_config(REPO / "configs/digits.yaml", []), a.accelerator) == 0.0
    assert dict(PEAK_TFLOPS)["H100"]["bf16"] == 989.4
