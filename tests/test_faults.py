"""Faults injected for real: killed and signalled runs, broken shards, NaN, wrong configs, a dying rank."""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from conftest import BIN, ENV, REPO, TINY
from bidvl.checkpoint import CheckpointError
from bidvl.config import ConfigError, load_config
from bidvl.data import ShardError, eval_stream, train_stream
from bidvl.data.meta import shard_name, write_meta





def train_cmd(run, shards, steps, *extra):
    return [sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={run}",
            f"data.train={shards}", f"train.max_steps={steps}", *extra]


def newest_complete(run: Path) -> int:
    done = [int(p.parent.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*/COMPLETE")]
    return max(done, default=0)


def exported(run: Path) -> dict:
    return {n: load_file(run / "model" / f"{n}.safetensors") for n in ("energy", "encoder", "generator")}


def assert_same_weights(a: dict, b: dict):
    for net in a:
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"


# ------------------------------------------------------------------ process faults


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_exact(tmp_path, digits16):
    steps, extra = 40, ["checkpoint.every=1", "checkpoint.keep=2"]
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(whole, digits16, steps, *extra), env=ENV, check=True, capture_output=True)
    run, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < 10:
        before = newest_complete(run) if run.exists() else 0
        proc = subprocess.Popen(train_cmd(run, digits16, steps, *extra), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Start-up (imports) takes a few seconds; then a step and a checkpoint every ~0.1 s.
        time.sleep(rng.uniform(3.0, 7.0))
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        after = newest_complete(run)
        assert after >= before  # a kill never costs a completed checkpoint
    assert kills >= 10
    final = subprocess.run(train_cmd(run, digits16, steps, *extra), env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert_same_weights(exported(whole), exported(run))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_and_exits_cleanly(tmp_path, digits16, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, digits16, 100000, "checkpoint.every=100000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "config.yaml").exists():
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert newest_complete(run) > 0
    # After the current step, or at once when the signal came while the loop waited for data.
    assert re.search(rf"signal {int(sig)}( while waiting for data)?: checkpointing", out), out[-2000:]


@pytest.mark.slow
def test_a_dying_rank_ends_the_job_naming_it(tmp_path, digits16):
    run = tmp_path / "run"
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", str(REPO / "launch/train.py"), *TINY, f"run.dir={run}",
           f"data.train={digits16}", "train.max_steps=100000", "checkpoint.every=100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "config.yaml").exists():
        time.sleep(0.2)
    time.sleep(3)
    children = subprocess.run(["pgrep", "-f", f"run.dir={run}"], capture_output=True, text=True)
    trainers = [int(p) for p in children.stdout.split() if int(p) != proc.pid]
    ranks = {}
    for pid in trainers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in environ if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0].split(b"=")[1])] = pid
    assert set(ranks) == {0, 1}, (trainers, ranks)
    os.kill(ranks[1], signal.SIGKILL)
    t0 = time.time()
    try:
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.time() - t0 < 120
    assert "rank" in out and "1" in out, out[-2000:]


# ------------------------------------------------------------------ data faults


def write_shards(folder: Path, samples, res=8, channels=1):
    """samples: list of lists of (member name, bytes), one list per sample, all in one shard."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / shard_name("train", 0), "w") as tar:
        for members in samples:
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_meta(folder, {"source": "test", "resolution": res, "channels": channels, "num_classes": None,
                        "options": {}, "splits": {"train": {"count": len(samples), "shards": [
                            {"name": shard_name("train", 0), "count": len(samples)}]}}})
    return folder


def png(shape, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(np.zeros(shape, np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def good(i):
    return [(f"s{i:04d}.png", png((8, 8))), (f"s{i:04d}.cls", b"1")]


BAD = {
    "non-image member": ([("s0003.txt", b"hello")], r"s0003.*\.txt is not allowed"),
    "pickle member": ([("s0003.pickle", b"\x80\x04K\x01.")], r"s0003.*\.pickle is not allowed"),
    "undecodable image": ([("s0003.png", b"not a png at all")], r"s0003.*not a readable image"),
    "wrong size": ([("s0003.png", png((9, 8)))], r"s0003.*8x9, expected 8x8"),
    "wrong channels": ([("s0003.png", png((8, 8, 3), "RGB"))], r"s0003.*mode RGB, expected L"),
    "decompression bomb": ([("s0003.png", png((5000, 5000)))], r"s0003.*5000x5000, refusing"),
}


@pytest.mark.parametrize("fault", sorted(BAD))
def test_bad_members_are_named_and_can_be_skipped(tmp_path, fault):
    members, message = BAD[fault]
    samples = [good(i) for i in range(10)]
    samples[3] = members
    folder = write_shards(tmp_path / "s", samples)
    with pytest.raises(ShardError, match=r"train-000000\.tar.*" + message):
        list(eval_stream(folder, "train", batch_size=4))
    stream = iter(train_stream(folder, "train", batch_size=4, seed=0, on_error="skip"))
    skipped = sum(next(stream)[2] for _ in range(6))
    assert skipped >= 1


def test_folder_level_faults_are_named(tmp_path):
    with pytest.raises(ShardError, match="meta.json is missing"):
        (tmp_path / "nometa").mkdir()
        train_stream(tmp_path / "nometa", "train", batch_size=2, seed=0)
    folder = write_shards(tmp_path / "empty", [good(0)])
    meta = json.loads((folder / "meta.json").read_text())
    meta["splits"]["train"] = {"count": 0, "shards": []}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="lists no shards"):
        train_stream(folder, "train", batch_size=2, seed=0)
    folder = write_shards(tmp_path / "unreadable", [good(0)])
    (folder / shard_name("train", 0)).unlink()
    (folder / shard_name("train", 0)).mkdir()  # a path that exists but cannot be read as a file
    with pytest.raises(ShardError, match=r"train-000000\.tar listed in meta.json is not a regular file"):
        list(eval_stream(folder, "train", batch_size=2))
    (folder / shard_name("train", 0)).rmdir()
    with pytest.raises(ShardError, match=r"train-000000\.tar listed in meta.json is missing"):
        eval_stream(folder, "train", batch_size=2)


def test_meta_json_cannot_point_outside_its_folder(tmp_path):
    folder = write_shards(tmp_path / "s", [good(0)])
    meta = json.loads((folder / "meta.json").read_text())
    for name in ("../outside.tar", "/etc/passwd", ".hidden.tar"):
        meta["splits"]["train"]["shards"][0]["name"] = name
        (folder / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ShardError, match="is not a plain file name"):
            train_stream(folder, "train", batch_size=1, seed=0)


@pytest.mark.parametrize("edit,error", [
    (lambda m: m["splits"]["train"]["shards"][0].update(count=0), r"splits.train.shards\[0\].count 0, expected an integer in \[1, 5000\]"),
    (lambda m: m["splits"]["train"]["shards"][0].update(count="1"), r"splits.train.shards\[0\].count '1'"),
    (lambda m: m["splits"]["train"].update(shards="train-000000.tar"), r"splits.train.shards must be a list of objects"),
    (lambda m: m.update(resolution=0), r"resolution 0, expected an integer in \[1, 4096\]"),
    (lambda m: m.update(channels=2), r"channels 2, expected 1 or 3"),
    (lambda m: m.update(splits={}), r"splits must be a non-empty object"),
], ids=["count-0", "count-text", "shards-text", "resolution-0", "channels-2", "no-splits"])
def test_meta_json_values_out_of_range_are_named(tmp_path, edit, error):
    """A crafted meta.json (a shard count of 0 was a ZeroDivisionError) fails naming the file and key."""
    folder = write_shards(tmp_path / "s", [good(0)])
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=rf"meta.json: {error}"):
        train_stream(folder, "train", batch_size=1, seed=0)


@pytest.mark.process
def test_skip_budget_stops_training_clearly(tmp_path):
    samples = [good(i) for i in range(40)]
    for i in (3, 9, 17):
        samples[i] = [(f"s{i:04d}.png", b"garbage")]
    folder = write_shards(tmp_path / "s", samples, res=16)
    # Re-encode the good ones at 16 px so the tiny 16 px nets can train on them.
    samples = [[(f"s{i:04d}.png", png((16, 16)))] if i not in (3, 9, 17) else samples[i] for i in range(40)]
    folder = write_shards(tmp_path / "s", samples, res=16)
    run = tmp_path / "run"
    ok = subprocess.run(train_cmd(run, folder, 6, "data.on_error=skip", "data.max_skipped=100"),
                        env=ENV, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "skipping bad data" in ok.stderr
    stop = subprocess.run(train_cmd(tmp_path / "run2", folder, 6, "data.on_error=skip", "data.max_skipped=0"),
                          env=ENV, capture_output=True, text=True)
    assert stop.returncode != 0
    assert "more than data.max_skipped=0" in stop.stderr
    fail = subprocess.run(train_cmd(tmp_path / "run3", folder, 6), env=ENV, capture_output=True, text=True)
    assert fail.returncode != 0
    assert "not a readable image" in fail.stderr


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.process
def test_a_stop_ends_a_loader_that_spins_on_a_huge_skip_budget(tmp_path, workers):
    """Every sample bad, data.on_error=skip with a skip budget that is never spent: the loader
    spins, skipping, and no batch ever comes. SIGTERM still ends the run within seconds, exit 0,
    saying so (step 0: nothing to checkpoint)."""
    bad = [[(f"s{i:03d}.png", b"\x89PNG\r\n\x1a\n not really")] for i in range(400)]
    folder = write_shards(tmp_path / "s", bad, res=16)
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, folder, 100, "data.on_error=skip", "data.max_skipped=1000000000",
                                      f"data.num_workers={workers}", "health.every=0"),
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(run.glob("config.yaml")):  # the trainer is up and reading
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(3.0)  # spinning: hundreds of samples skipped a second
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - sent < 15
    assert "bad samples or shards skipped so far" in err  # it did spin
    assert f"training stopped by signal {signal.SIGTERM.value} while waiting for data at step 0" in out + err
    assert not list(run.glob("checkpoints/step_*"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mangled_tars_give_batches_or_shard_errors(tmp_path, data):
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    write_shards(folder, [good(i) for i in range(6)])
    path = folder / shard_name("train", 0)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))
    try:
        for images, labels, index in eval_stream(folder, "train", batch_size=4):
            assert images.shape == (4, 1, 8, 8)
            assert torch.isfinite(images).all()
    except ShardError:
        pass


# ------------------------------------------------------------------ numeric and config faults


def tiny_trainer(tmp_path, shards, *overrides):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml",
                      [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={shards}", *overrides])
    return Trainer(cfg)


def sync_step(trainer, batch) -> bool:
    """One training step as fit() takes it, that step a sync step: the non-finite policy applied."""
    trainer.train_step(batch)
    trainer.state.step += 1
    return trainer.apply_nonfinite_policy()


def test_repeated_nan_rolls_back_with_lower_lr_then_stops(tmp_path, digits16):
    trainer = tiny_trainer(tmp_path, digits16, "train.nonfinite_patience=2", "train.max_rollbacks=1",
                           "train.on_nonfinite=rollback", "train.rollback_lr_scale=0.5")
    good_batch = [torch.rand(16, 1, 16, 16) * 2 - 1]
    nan_batch = [torch.full((16, 1, 16, 16), float("nan"))]
    trainer.train_step(good_batch)
    trainer.state.step = 1
    trainer.save_checkpoint()
    weights = [p.detach().clone() for p in trainer.energy_net.parameters()]
    base_lr = trainer.cfg.train.energy_optim.lr
    decay = trainer.cfg.train.energy_optim.lr_decay
    trainer.steps_per_epoch = 1  # (fit() sets it from the data): step 1 is in epoch 1
    assert not sync_step(trainer, nan_batch)
    assert sync_step(trainer, nan_batch)  # second in a row (step 3): roll back
    assert trainer.state.step == 1 and trainer.state.rollbacks == 1
    assert trainer.energy_opt.param_groups[0]["lr"] == pytest.approx(base_lr * decay * 0.5)
    assert decay != 1.0 and trainer.state.lr_scale == 0.5
    for a, b in zip(weights, trainer.energy_net.parameters()):
        assert torch.equal(a, b)
    sync_step(trainer, nan_batch)
    with pytest.raises(FloatingPointError, match="after 1 rollbacks"):
        sync_step(trainer, nan_batch)
    trainer.close()


def test_only_consecutive_nonfinite_steps_count_and_skip_never_stops(tmp_path, digits16):
    good = [torch.rand(16, 1, 16, 16) * 2 - 1]
    nan = [torch.full((16, 1, 16, 16), float("nan"))]
    trainer = tiny_trainer(tmp_path, digits16, "train.nonfinite_patience=2", "train.on_nonfinite=stop")
    assert not sync_step(trainer, nan)
    assert not sync_step(trainer, good)
    assert trainer.state.skipped_in_a_row == 0  # a finite step ends the run of non-finite ones
    assert not sync_step(trainer, nan)
    with pytest.raises(FloatingPointError, match=r"^2 consecutive steps with non-finite loss or gradients at "
                                                 r"step 4 \(train.on_nonfinite=stop\)$"):
        sync_step(trainer, nan)
    trainer.close()
    trainer = tiny_trainer(tmp_path / "skip", digits16, "train.nonfinite_patience=1", "train.on_nonfinite=skip")
    for _ in range(3):
        assert not sync_step(trainer, nan)
    assert trainer.state.skipped_in_a_row == 3 and trainer.state.rollbacks == 0
    trainer.close()
    trainer = tiny_trainer(tmp_path / "none", digits16, "train.nonfinite_patience=1", "train.on_nonfinite=rollback")
    with pytest.raises(FloatingPointError, match=r"^1 consecutive steps with non-finite loss or gradients at "
                                                 r"step 1 and no checkpoint to roll back to$"):
        sync_step(trainer, nan)
    trainer.close()


def test_each_rollback_scales_the_learning_rates_again_and_restores_the_ema(tmp_path, digits16, capsys):
    trainer = tiny_trainer(tmp_path, digits16, "train.nonfinite_patience=1", "train.max_rollbacks=2",
                           "train.on_nonfinite=rollback", "train.rollback_lr_scale=0.5", "train.ema=0.5")
    good = [torch.rand(16, 1, 16, 16) * 2 - 1]
    nan = [torch.full((16, 1, 16, 16), float("nan"))]
    trainer.steps_per_epoch = 1000
    trainer.train_step(good)
    trainer.state.step = 1
    trainer.save_checkpoint()
    saved_ema = [p.detach().clone() for p in trainer.ema.module.parameters()]
    trainer.train_step(good)  # moves the EMA past the checkpoint's
    assert any(not torch.equal(a, b) for a, b in zip(saved_ema, trainer.ema.module.parameters()))
    base = trainer.cfg.train.energy_optim.lr
    for scale in (0.5, 0.25):
        assert sync_step(trainer, nan)
        assert trainer.state.lr_scale == scale
        assert trainer.energy_opt.param_groups[0]["lr"] == pytest.approx(base * scale)
        assert all(torch.equal(a, b) for a, b in zip(saved_ema, trainer.ema.module.parameters()))
    assert "rolled back to step_00000001, learning rates x0.25" in capsys.readouterr().out
    trainer.close()


def test_the_policy_acts_at_the_next_sync_step_on_a_patience_reached_between(tmp_path, digits16):
    """Steps between sync steps read nothing: a run of non-finite steps that reached the patience
    and ended before the sync step is still acted on there, naming both steps; the counts are
    exact."""
    good = [torch.rand(16, 1, 16, 16) * 2 - 1]
    nan = [torch.full((16, 1, 16, 16), float("nan"))]
    trainer = tiny_trainer(tmp_path, digits16, "train.nonfinite_patience=2", "train.on_nonfinite=stop")
    for batch in (good, nan, nan, nan, good):  # steps 1..5; the patience is reached at step 3
        trainer.train_step(batch)
        trainer.state.step += 1
    assert trainer.state.skipped_steps == 0  # nothing read yet
    with pytest.raises(FloatingPointError, match=r"^2 consecutive steps with non-finite loss or gradients at "
                                                 r"step 3 \(acted on at step 5, the first sync step after it\) "
                                                 r"\(train.on_nonfinite=stop\)$"):
        trainer.apply_nonfinite_policy()
    assert trainer.state.skipped_steps == 6 and trainer.state.skipped_in_a_row == 0
    trainer.close()
    trainer = tiny_trainer(tmp_path / "short", digits16, "train.nonfinite_patience=3", "train.on_nonfinite=stop")
    for batch in (nan, nan, good, nan, nan):  # never 3 in a row
        trainer.train_step(batch)
        trainer.state.step += 1
    assert not trainer.apply_nonfinite_policy()
    assert trainer.state.skipped_steps == 8 and trainer.state.skipped_in_a_row == 2
    assert not sync_step(trainer, good) and trainer.state.skipped_in_a_row == 0
    trainer.close()


def test_nan_stop_policy(tmp_path, digits16):
    trainer = tiny_trainer(tmp_path, digits16, "train.nonfinite_patience=1", "train.on_nonfinite=stop")
    with pytest.raises(FloatingPointError, match="train.on_nonfinite=stop"):
        sync_step(trainer, [torch.full((16, 1, 16, 16), float("nan"))])
    trainer.close()


@pytest.mark.process
def test_resume_from_another_architecture_fails_before_the_first_step(tmp_path, digits16):
    run = tmp_path / "run"
    subprocess.run(train_cmd(run, digits16, 2, "checkpoint.every=2"), env=ENV, check=True, capture_output=True)
    ckpt = next((run / "checkpoints").glob("step_*"))
    p = subprocess.run(train_cmd(tmp_path / "other", digits16, 4, "model.energy_width=16",
                                 f"checkpoint.resume={ckpt}"), env=ENV, capture_output=True, text=True)
    assert p.returncode == 2
    assert "model.energy_width=8" in p.stderr and "model.energy_width=16" in p.stderr


def test_config_faults_fail_before_training(tmp_path, digits16):
    with pytest.raises(ConfigError, match="data.on_error='ignore'"):
        load_config(REPO / "configs/digits.yaml", ["data.on_error=ignore"])
    trainer = tiny_trainer(tmp_path, digits16, "data.channels=3")
    with pytest.raises(ConfigError, match="data.channels=3 but .*meta.json says channels=1"):
        trainer.fit()
    trainer.close(synchronise=False)
    trainer = tiny_trainer(tmp_path, digits16, f"checkpoint.resume={tmp_path}")
    with pytest.raises(CheckpointError, match="checkpoint.resume=.*not a complete checkpoint"):
        trainer.checkpointer.find_resume()
    trainer.close()


@pytest.mark.process
def test_a_shard_that_differs_from_its_recorded_sha256_is_bad_data(tmp_path, digits16, capfd):
    """One label byte changed in a shard (the tar and the image still read: it would train
    silently): the sha256 that make_shards recorded in meta.json names it, for a local folder,
    an explicit list and a pipe: source; data.on_error=skip skips it and counts it;
    verify=False (data.verify_shards=false) reads it as it is."""
    import shutil

    from bidvl.data import ShardError, eval_stream, train_stream

    folder = tmp_path / "digits16"
    shutil.copytree(digits16, folder)
    shard = folder / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    label = data[member.offset_data]
    data[member.offset_data] = ord("0") + (label - ord("0") + 1) % 10
    shard.write_bytes(bytes(data))
    message = rf"shard {shard}: its sha256 [0-9a-f]{{16}}\.\.\. is not the [0-9a-f]{{16}}\.\.\. that meta.json records"
    one = f"{folder}/train-{{000000..000000}}.tar"
    for source in (folder, one):
        with pytest.raises(ShardError, match=message):
            list(eval_stream(source, "train", 16))
    with pytest.raises(ShardError, match=message):
        next(iter(train_stream(one, "train", 4, seed=0)))
    with pytest.raises(ShardError, match=r"shard pipe:cat .*/train-000000.tar: its sha256 "):
        list(eval_stream(f"pipe:cat {folder}/{{}}", "train", 16))
    stream = iter(train_stream(f"{folder}/train-{{000000..000001}}.tar", "train", 4, seed=0, on_error="skip"))
    skipped = sum(next(stream)[2] for _ in range(36))  # three epochs of resampled shards
    assert skipped >= 1 and "its sha256" in capfd.readouterr().err
    index = torch.cat([b[2] for b in eval_stream(one, "train", 16, verify=False)])
    assert int((index >= 0).sum()) == json.loads((folder / "meta.json").read_text())["splits"]["train"]["shards"][0]["count"]
