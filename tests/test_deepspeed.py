"""DeepSpeed ZeRO-1/2 on 2 CPU processes: same weights as DDP, resume, bf16, refusals.

DeepSpeed runs on the CPU through its CPU accelerator and gloo (the engine picks gloo when there is
no GPU); `ACCELERATE_USE_CPU` must not be set, or Accelerate drops DeepSpeed. The launcher gets the
repository's own launch/accelerate/deepspeed_zero{1,2}.yaml with --num_processes 2.
"""

import os
import subprocess

import pytest
import torch
import yaml

from conftest import BIN, NETS, REPO, TINY, weights

pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")


def launch(run_dir, shards, steps, *extra, config=None, processes=2, precision="no", timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    if config is None and processes == 1:  # plain one-process training (on the GPU if there is one)
        head = []
    elif config is None:  # DDP on 2 CPU processes
        env["ACCELERATE_USE_CPU"] = "1"
        head = ["--multi_gpu"]
    else:
        head = ["--config_file", str(config), "--mixed_precision", precision]
    cmd = [str(BIN / "accelerate"), "launch", *head, "--num_processes", str(processes),
           "--main_process_port", "0", str(REPO / "launch/train.py"),
           *TINY, f"run.dir={run_dir}", f"data.train={shards}", f"train.max_steps={steps}",
           "checkpoint.every=2", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def zero(stage):
    return REPO / f"launch/accelerate/deepspeed_zero{stage}.yaml"


def initial_weights(run) -> dict:
    """The nets as Trainer builds them before step 1 (same seed, same order), keyed like weights()."""
    from accelerate.utils import set_seed

    from bidvl.config import load_config
    from bidvl.models import build_nets

    cfg = load_config(run / "model" / "config.yaml")
    set_seed(cfg.run.seed)
    nets = build_nets(cfg.model, channels=cfg.data.channels, resolution=cfg.data.resolution)
    return {f"{name}.{k}": t.float() for name, net in zip(NETS, nets) for k, t in net.state_dict().items()}


def assert_same_weights(a, b, atol=1e-6):
    x, y = weights(a), weights(b)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_ddp_zero1_and_zero2_end_with_the_same_weights(tmp_path, digits16):
    runs = {}
    for label, config in (("ddp", None), ("zero1", zero(1)), ("zero2", zero(2))):
        runs[label] = tmp_path / label
        p = launch(runs[label], digits16, 4, config=config)
        assert p.returncode == 0, p.stderr[-3000:]
    assert_same_weights(runs["ddp"], runs["zero1"])
    assert_same_weights(runs["ddp"], runs["zero2"])
    # DeepSpeed writes one checkpoint folder per engine, beside our own files.
    ckpt = runs["zero2"] / "checkpoints/step_00000004"
    assert {"pytorch_model", "pytorch_model_1", "COMPLETE", "replicas.json"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_zero2_resume_gives_the_uninterrupted_weights(tmp_path, digits16):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert launch(whole, digits16, 4, config=zero(2)).returncode == 0
    assert launch(parts, digits16, 2, config=zero(2)).returncode == 0
    p = launch(parts, digits16, 4, config=zero(2))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    assert_same_weights(whole, parts, atol=0)
    # bidvl.load reads a DeepSpeed checkpoint (one folder per engine, no per-net files): the step-4
    # checkpoint holds the exported weights; step 2 differs from them.
    import bidvl

    final = bidvl.load(whole, checkpoint="final", ema=False)
    for step, same in ((4, True), (2, False)):
        loaded = bidvl.load(whole, checkpoint=step, ema=False)
        assert (loaded.step, loaded.kind) == (step, "checkpoint")
        assert not (whole / "checkpoints" / f"step_{step:08d}" / "model.safetensors").exists()
        equal = {}
        for net in ("energy_net", "encoder", "generator"):
            a, b = getattr(loaded, net).state_dict(), getattr(final, net).state_dict()
            assert a.keys() == b.keys(), net
            equal[net] = all(torch.equal(a[k], b[k]) for k in a)
        assert all(equal.values()) if same else not any(equal.values()), (step, equal)


@pytest.mark.slow
def test_zero2_bf16_trains_and_evaluates(tmp_path, digits16):
    run = tmp_path / "bf16"
    p = launch(run, digits16, 2, "train.mixed_precision=bf16", "eval.every=2", "eval.metrics=rmse,ood",
               "eval.max_test=32", config=zero(2), precision="bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    for name, t in weights(run).items():
        assert torch.isfinite(t).all(), name


@pytest.mark.process
def test_deepspeed_refuses_what_it_cannot_do(tmp_path, digits16):
    cfg = yaml.safe_load(zero(2).read_text())
    cfg["deepspeed_config"]["zero_stage"] = 3
    stage3 = tmp_path / "zero3.yaml"
    stage3.write_text(yaml.safe_dump(cfg))
    p = launch(tmp_path / "z3", digits16, 1, config=stage3, processes=1)
    assert p.returncode != 0 and "zero_stage=3" in p.stderr
    p = launch(tmp_path / "no", digits16, 1, "objective.latent_term=not_offset", config=zero(2), processes=1)
    assert p.returncode != 0 and "not_offset" in p.stderr
    p = launch(tmp_path / "compiled", digits16, 1, "train.compile=true", config=zero(2), processes=1)
    assert p.returncode != 0 and "train.compile=true under DeepSpeed" in p.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_zero2_on_one_gpu_matches_plain_training_and_trains_in_bf16(tmp_path, digits16):
    """The one-GPU DeepSpeed smoke run (launch/gpu_checks.sh): ZeRO-2 on one process is plain Adam
    training, so fp32 weights after 6 steps match a plain 1-GPU run up to GPU non-determinism
    (cuDNN's backward kernels); bf16 ZeRO-2 then trains, checkpoints and evaluates."""
    plain, zero2 = tmp_path / "plain", tmp_path / "zero2"
    for run, config in ((plain, None), (zero2, zero(2))):
        p = launch(run, digits16, 6, config=config, processes=1)
        assert p.returncode == 0, p.stderr[-3000:]
    x, y, init = weights(plain), weights(zero2), initial_weights(plain)
    assert x.keys() == y.keys() == init.keys()
    # Per tensor: |plain - ZeRO-2| against how far training moved it from the initial weights.
    ratios = {k: (x[k] - y[k]).abs().max().item() / max((x[k] - init[k]).abs().max().item(), 1e-6)
              for k in x if not k.endswith("num_batches_tracked")}
    worst = max(ratios, key=ratios.get)
    print(f"plain vs ZeRO-2 after 6 steps: worst |difference| / |change from init| = {ratios[worst]:.3g} ({worst})")
    assert ratios[worst] < 0.01
    run = tmp_path / "bf16"
    p = launch(run, digits16, 6, "train.mixed_precision=bf16", "eval.every=6", "eval.metrics=rmse,ood",
               "eval.max_test=32", config=zero(2), processes=1, precision="bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "checkpoints/step_00000006/COMPLETE").is_file()
    assert all(torch.isfinite(t).all() for t in weights(run).values())
