"""Faults on the paths real runs take: errors with DataLoader workers end the whole process tree,
Ctrl-C checkpoints, damaged checkpoints are never trained on, one trainer per run folder.

Every subprocess here runs under a hard timeout: a hang fails the test instead of holding CI.
"""

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN, ENV, REPO, TINY, finish, run_bounded
from bidvl import checkpoint
from bidvl import run_dir as layout
from bidvl.checkpoint import CheckpointError, verify
from bidvl.run_dir import complete_checkpoints, step_name
from bidvl.config import load_config

WORKERS = ["data.num_workers=1"]


def train_cmd(run, shards, steps, *extra):
    return [sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={run}",
            f"data.train={shards}", f"train.max_steps={steps}", *extra]


def two_process_cmd(run, shards, steps, *extra):
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            "0", str(REPO / "launch/train.py"), *TINY, f"run.dir={run}", f"data.train={shards}",
            f"train.max_steps={steps}", *extra]


def leftover(run) -> list[str]:
    """Processes still running with this run folder on their command line (trainers, workers)."""
    p = subprocess.run(["pgrep", "-af", f"run.dir={run}"], capture_output=True, text=True)
    return [line for line in p.stdout.splitlines() if "pgrep" not in line]


def truncated_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for shard in dst.glob("train-*.tar"):
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    return dst


# ------------------------------------------------------------------ errors end the process tree


@pytest.mark.parametrize("launch", [train_cmd, two_process_cmd], ids=["1 process", "2 processes"])
@pytest.mark.process
def test_a_bad_shard_with_loader_workers_ends_the_run_with_one_line(tmp_path, digits16, launch):
    """Before: the error was printed, then the process waited for ever for its worker (which
    ignores SIGTERM) at exit, and the worker outlived it."""
    shards = truncated_copy(digits16, tmp_path / "shards")
    run = tmp_path / "run"
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    t0 = time.time()
    code, _, err = run_bounded(launch(run, shards, 1000, *WORKERS), timeout=120, env=env)
    assert code != 0, err[-2000:]
    assert "truncated" in err and "train-" in err, err[-2000:]
    if launch is train_cmd:
        assert code == 2
        assert err.count("error: ") == 1 and "Traceback" not in err, err[-2000:]
        error = err[err.index("error: "):].splitlines()[0]
        assert "truncated" in error
    time.sleep(1)
    assert leftover(run) == [], f"processes left after {time.time() - t0:.0f} s: {leftover(run)}"


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.process
def test_a_stop_signal_to_the_process_group_checkpoints_then_resumes(tmp_path, digits16, sig, status):
    """Ctrl-C (SIGINT) and SLURM's SIGTERM reach every process of the group, loader workers
    included: the run checkpoints and exits (130 after Ctrl-C, 0 after SIGTERM)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run, digits16, 100000, *WORKERS, "checkpoint.every=100000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run / "tensorboard").rglob("events.*")):
            time.sleep(0.2)
        time.sleep(2)  # some steps, with the worker running
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    # After the current step, or at once when the signal came while the loop waited for data.
    assert re.search(rf"signal {int(sig)}( while waiting for data)?: checkpointing", out + err), err[-2000:]
    found = complete_checkpoints(run)
    assert found and verify(found[-1])
    assert leftover(run) == []
    code, _, err = run_bounded(train_cmd(run, digits16, layout.step_of(found[-1]) + 2), timeout=120)
    assert code == 0 and f"resumed from {found[-1]}" in err + _, err[-2000:]


@pytest.mark.process
def test_second_sigint_aborts_at_once(tmp_path, digits16):
    run = tmp_path / "run"
    # A slow step (bigger nets) so that the second Ctrl-C lands while the first is pending.
    proc = subprocess.Popen(train_cmd(run, digits16, 100000, *WORKERS, "model.energy_width=256",
                                      "model.generator_width=256", "checkpoint.every=100000"), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((run / "tensorboard").rglob("events.*")):
            time.sleep(0.2)
        time.sleep(1)  # training, its loader worker started
        os.killpg(proc.pid, signal.SIGINT)
        # The second Ctrl-C after the first was handled: two signals that arrive while Python is
        # inside one C call reach the handler once.
        seen = ""
        while time.time() < deadline and "interrupted: checkpointing" not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:  # the process ended
                break
            seen += chunk.decode(errors="replace")
        assert "interrupted: checkpointing" in seen, seen[-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.time()
        proc.communicate(timeout=30)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode in (-signal.SIGINT, 130), proc.returncode
    assert elapsed < 10
    time.sleep(1)
    assert leftover(run) == []


# ------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def trained_twice(tmp_path_factory, digits16):
    """A run with complete checkpoints at steps 2 and 4 (trained once, copied by each test)."""
    run = tmp_path_factory.mktemp("two_checkpoints") / "run"
    code, _, err = run_bounded(train_cmd(run, digits16, 4, "checkpoint.every=2"), timeout=180)
    assert code == 0, err[-2000:]
    return run


def two_checkpoints(tmp_path, trained_twice):
    run = tmp_path / "run"
    shutil.copytree(trained_twice, run)
    return run


def flip_bytes(path: Path, at: int = -64):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped weights", "truncated weights", "missing rng state", "garbage rng state"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_used(tmp_path, digits16, trained_twice, damage):
    run = two_checkpoints(tmp_path, trained_twice)
    newest = run / "checkpoints" / step_name(4)
    assert verify(newest)
    if damage == "flipped weights":
        flip_bytes(newest / "model.safetensors")  # same size: only the digest tells
        expected = "model.safetensors does not match the sha256"
    elif damage == "truncated weights":
        (newest / "model_1.safetensors").write_bytes((newest / "model_1.safetensors").read_bytes()[:100])
        expected = "model_1.safetensors has 100 bytes"
    elif damage == "missing rng state":
        next(newest.glob("random_states_*.pkl")).unlink()
        expected = "random_states_0.pkl is missing"
    else:
        next(newest.glob("random_states_*.pkl")).write_bytes(b"garbage")
        expected = "random_states_0.pkl has 7 bytes"
    with pytest.raises(checkpoint.DamagedCheckpoint, match=expected):
        verify(newest)
    code, out, err = run_bounded(train_cmd(run, digits16, 6, "checkpoint.every=2"), timeout=180)
    assert code == 0, err[-2000:]
    assert expected in err and "falling back" in err
    assert f"resumed from {run / 'checkpoints' / step_name(2)} at step 2" in out + err
    # The damaged one was replaced by a good step 4 of the resumed run.
    assert [layout.step_of(p) for p in complete_checkpoints(run)] == [2, 4, 6]
    assert all(verify(p) for p in complete_checkpoints(run))


def test_damaged_checkpoint_stops_the_run_with_on_damaged_stop(tmp_path, digits16, trained_twice):
    run = two_checkpoints(tmp_path, trained_twice)
    flip_bytes(run / "checkpoints" / step_name(4) / "model_2.safetensors")
    code, _, err = run_bounded(train_cmd(run, digits16, 6, "checkpoint.on_damaged=stop"), timeout=120)
    assert code == 2 and "Traceback" not in err
    assert f"error: checkpoint {run / 'checkpoints' / step_name(4)}: model_2.safetensors does not match" in err
    # Nothing was trained or written: the damaged checkpoint is still there for inspection.
    assert [layout.step_of(p) for p in complete_checkpoints(run)] == [2, 4]


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path, digits16, trained_twice):
    """A checkpoint from before manifests (its marker records none) loads with a warning; a current
    one whose manifest was deleted is damaged (verification cannot be turned off by deleting it)."""
    run = two_checkpoints(tmp_path, trained_twice)
    newest = run / "checkpoints" / step_name(4)
    (newest / layout.MANIFEST).unlink()
    code, out, err = run_bounded(train_cmd(run, digits16, 6, "checkpoint.on_damaged=stop"), timeout=120)
    assert code == 2 and f"error: checkpoint {newest}: manifest.json is missing (its COMPLETE marker records one)" in err
    (newest / layout.MARKER).write_text("4\n")  # as versions before manifests wrote it
    code, out, err = run_bounded(train_cmd(run, digits16, 6, "checkpoint.every=2"), timeout=120)
    assert code == 0, err[-2000:]
    assert "cannot be verified" in err and f"resumed from {newest}" in out + err


def test_a_full_disk_names_enospc_and_keeps_the_previous_checkpoint(tmp_path, digits16, monkeypatch):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"])
    trainer = Trainer(cfg)
    trainer.state.step = 2
    first = trainer.save_checkpoint()

    def no_space(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "_write_manifest", no_space)
    trainer.state.step = 4
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step_00000004: ENOSPC .*model.safetensors"):
        trainer.save_checkpoint()
    assert complete_checkpoints(tmp_path / "run") == [first] and verify(first)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp_*"))
    trainer.close(synchronise=False)


@pytest.mark.parametrize("error", ["torch", "safetensors"])
def test_a_full_disk_that_raises_no_oserror_is_named_and_cleaned_up(tmp_path, digits16, monkeypatch, error):
    """torch's zip writer and safetensors report a full disk as RuntimeError / SafetensorError:
    named with the path as ENOSPC (from the free space), the temp folder removed, the complete
    checkpoint and the model export kept."""
    import safetensors.torch

    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}",
                                                     "train.ema=0.9"])  # the EMA file: our safetensors write
    trainer = Trainer(cfg)
    trainer.state.step = 2
    first = trainer.save_checkpoint()
    trainer.export()

    def full(*args, **kwargs):
        if error == "torch":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 326784 vs 326676")
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "_write_manifest" if error == "torch" else "save_file", full)
    trainer.state.step = 4
    name = "RuntimeError" if error == "torch" else "SafetensorError"
    if error == "torch":  # the free space decides: a full disk is ENOSPC, anything else keeps its type
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: __import__("collections").namedtuple(
            "usage", "total used free")(1 << 30, 1 << 30, 4096))
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint step_00000004: ENOSPC \(no space left on "
                                              rf"device; {name}: .*\) at .*\.tmp_step_00000004; its temp folder was "
                                              r"removed; the complete checkpoints in .* are untouched$"):
        trainer.save_checkpoint()
    assert complete_checkpoints(tmp_path / "run") == [first] and verify(first)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp_*"))
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match=r"^cannot write the model export .*/run/model: "):
        trainer.export()
    assert not (tmp_path / "run" / ".tmp_model").exists() and (tmp_path / "run" / "model" / "energy.safetensors").is_file()
    trainer.close(synchronise=False)


@pytest.mark.process
def test_a_real_full_disk_mid_run_exits_2_and_keeps_the_complete_checkpoint(tmp_path, digits16):
    """The run folder on a 1.5 MB tmpfs (mounted here when permitted): the first checkpoint
    (~1 MB) fits, the second does not. One `error:` line naming ENOSPC and the path, exit 2, no
    temp folder left, the first checkpoint complete and verified; the run resumes from it once
    there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.decode().strip()}); "
                    "test_a_full_disk_that_raises_no_oserror_is_named_and_cleaned_up injects the same errors")
    try:
        run = disk / "run"
        code, out, err = run_bounded(train_cmd(run, digits16, 8, "checkpoint.every=2", "health.every=0"), timeout=180)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert re.search(r"error: cannot write checkpoint step_00000004: ENOSPC \(.*\) at .*/run/checkpoints/"
                         r"\.tmp_step_00000004.*; its temp folder was removed", err), err[-3000:]
        found = complete_checkpoints(run)
        assert [layout.step_of(f) for f in found] == [2] and verify(found[0])
        assert not list((run / "checkpoints").glob(".tmp_*"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        code, out, err = run_bounded(train_cmd(run, digits16, 4, "checkpoint.every=2", "health.every=0"), timeout=180)
        assert code == 0 and f"resumed from {found[0]}" in out + err, err[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_tracker_write_the_disk_refuses_stops_the_run_naming_it(tmp_path, digits16, monkeypatch):
    """TensorBoard's writer thread fails on a full disk and re-raises the bare OSError at the next
    write (here injected into its file writes): a WriteError naming ENOSPC and the trackers'
    folder, from fit(); the run's checkpoint is kept; closing after it does not raise again."""
    from tensorboard.summary.writer import record_writer

    from bidvl.engine import Trainer
    from bidvl.io import WriteError

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}",
                                                     "train.max_steps=8", "checkpoint.every=2", "health.every=0"])
    trainer = Trainer(cfg)
    real_write = record_writer.RecordWriter.write

    def write(self, data):
        if complete_checkpoints(tmp_path / "run"):  # the disk fills after the first checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(WriteError, match=rf"^cannot write the trackers' logs at step [34]: ENOSPC \(No space left "
                                            rf"on device\) at {tmp_path / 'run' / 'tensorboard'}; the complete "
                                            rf"checkpoints are untouched$"):
        trainer.fit()
    trainer.close(synchronise=False)  # the dead writer thread raises again: not over the first error
    found = complete_checkpoints(tmp_path / "run")
    assert [layout.step_of(f) for f in found] == [2] and verify(found[0])

    # The trackers' last write (end_training) refused at the end of a finished run: named too, after
    # the whole teardown (signal handlers back, nets freed).
    handler = signal.getsignal(signal.SIGTERM)
    finished = Trainer(load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'other'}",
                                                                  f"data.train={digits16}"]))

    def end_training():
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "other" / "tensorboard" / "x"))

    finished.accelerator.end_training = end_training
    with pytest.raises(WriteError, match=r"^cannot write the trackers' logs at step 0: EDQUOT \(Disk quota "
                                            r"exceeded\) at .*/other/tensorboard/x;"):
        finished.close()
    assert finished.energy_net is None and signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.process
def test_a_real_full_disk_under_the_trackers_exits_2_and_the_run_resumes(tmp_path, digits16):
    """RUN_DIR/tensorboard on a 64 KB tmpfs (mounted here when permitted), the checkpoints on the
    ordinary disk: the image grids fill it within a few steps; one `error:` line naming ENOSPC and
    the folder, exit 2, no traceback, the checkpoints complete; once there is room the run resumes."""
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(run / "tensorboard")],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.decode().strip()}); "
                    "test_a_tracker_write_the_disk_refuses_stops_the_run_naming_it injects the same error")
    try:
        cmd = train_cmd(run, digits16, 400, "checkpoint.every=2", "health.every=0", "log.every=1", "log.images_every=1")
        code, out, err = run_bounded(cmd, timeout=180)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert re.search(rf"error: cannot write the trackers' logs at step \d+: ENOSPC \(No space left on device\) "
                         rf"at {run / 'tensorboard'}", err), err[-3000:]
        found = complete_checkpoints(run)
        assert found and all(verify(f) for f in found)
        assert leftover(run) == []
    finally:
        subprocess.run(["umount", "-l", str(run / "tensorboard")], capture_output=True)
    newest = layout.step_of(complete_checkpoints(run)[-1])
    code, out, err = run_bounded(train_cmd(run, digits16, newest + 1), timeout=120)
    assert code == 0 and f"resumed from {run / 'checkpoints' / step_name(newest)}" in out + err, err[-2000:]


@pytest.mark.process
def test_an_evaluation_report_on_a_full_disk_is_one_line_and_keeps_the_old_report(tmp_path, digits16):
    """`bidvl evaluate` with RUN_DIR/eval on a full 16 KB tmpfs (mounted here when permitted; the
    injected form is tests/test_io.py's): exit 2, `error: cannot write ...step_N.json: ENOSPC`, the
    earlier report as it was, no temp file."""
    run = tmp_path / "run"
    code, _, err = run_bounded(train_cmd(run, digits16, 2, "health.every=0"), timeout=120)
    assert code == 0, err[-2000:]
    (run / "eval").mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(run / "eval")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.decode().strip()})")
    try:
        report = run / "eval" / "step_00000002.json"
        report.write_text('{"scalars": {}}\n')
        with open(run / "eval" / "fill", "wb", buffering=0) as f:  # fill the rest of the disk
            try:
                while True:
                    f.write(b"x" * 1024)
            except OSError:
                pass
        evaluate = [str(BIN / "bidvl"), "evaluate", "--run", str(run), "--metrics", "rmse", "--max-test", "32"]
        code, out, err = run_bounded(evaluate, timeout=120)
        assert code == 2 and "Traceback" not in err, err[-3000:]
        assert err.endswith(f"error: cannot write {report}: ENOSPC (No space left on device); the previous "
                            f"step_00000002.json, if any, is untouched\n"), err[-3000:]
        assert report.read_text() == '{"scalars": {}}\n'
        assert sorted(p.name for p in (run / "eval").iterdir()) == ["fill", "step_00000002.json"]
    finally:
        subprocess.run(["umount", "-l", str(run / "eval")], capture_output=True)


# ------------------------------------------------------------------ one trainer per run folder


@pytest.mark.process
def test_a_second_trainer_on_a_run_folder_is_refused_naming_the_holder(tmp_path, digits16):
    run = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run, digits16, 100000, *WORKERS, "checkpoint.every=5"), env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not complete_checkpoints(run):
            time.sleep(0.2)
        tmp_of_first = run / "checkpoints" / ".tmp_step_99999999"
        tmp_of_first.mkdir()  # as if the first run were writing a checkpoint
        code, _, err = run_bounded(train_cmd(run, digits16, 100000), timeout=120)
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert f"is in use by another training run (pid {first.pid} on host" in err
        assert tmp_of_first.is_dir()  # the refused run deleted nothing
        assert first.poll() is None  # and the first one trains on
        tmp_of_first.rmdir()
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    newest = layout.step_of(complete_checkpoints(run)[-1])
    code, out, err = run_bounded(train_cmd(run, digits16, newest + 1), timeout=120)
    assert code == 0 and f"resumed from {run / 'checkpoints' / step_name(newest)}" in out + err, err[-2000:]


@pytest.mark.process
def test_the_cli_refuses_a_folder_in_use_before_the_trainers_imports(tmp_path, digits16):
    """`bidvl train` locks the run folder as soon as the config is read: refused with the holder
    named, before Accelerate, DeepSpeed or the engine are imported (they took ~4 s of the ~7 s
    the refusal took here before)."""
    holder = layout.FolderLock(tmp_path / "run")
    assert holder.take() == ""
    try:
        argv = [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"]
        probe = ("import sys; from bidvl.cli import run_command; "
                 f"code = run_command('train', {argv!r}); "
                 "print(code, [m for m in ('accelerate', 'deepspeed', 'webdataset', 'bidvl.engine') if m in sys.modules])")
        code, out, err = run_bounded([sys.executable, "-c", probe], timeout=60)
        assert code == 0 and out.strip() == "2 []", out + err[-2000:]
        assert f"error: run.dir={tmp_path / 'run'} is in use by another training run (pid {os.getpid()} on host" in err
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "checkpoints").write_text("a file where the run needs a folder")
        code, _, err = run_bounded(train_cmd(broken, digits16, 1), timeout=60)
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert f"error: {broken / 'checkpoints'} is not a folder: run.dir={broken} needs it as one" in err
        assert not (broken / ".lock").exists()  # checked before anything is written
    finally:
        holder.release()


def test_a_lock_taken_early_is_adopted_by_its_trainer_and_released_at_its_end(tmp_path, digits16):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"])
    early = layout.FolderLock(tmp_path / "run")
    assert early.take() == ""
    a = Trainer(cfg, lock=early)
    a.checkpointer.begin()  # adopted: this process holds it once, through `early`
    assert early.held
    b = Trainer(cfg)  # another trainer in the same process is still refused
    with pytest.raises(CheckpointError, match=f"in use by another training run \\(pid {os.getpid()}"):
        b.checkpointer.begin()
    a.close()
    assert not early.held
    b.checkpointer.begin()
    b.close()
    with pytest.raises(ValueError, match="the lock held is"):
        checkpoint.RunLock(None, tmp_path / "other", held=early)


def test_the_lock_is_released_by_close_and_refused_in_process(tmp_path, digits16):
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"])
    a = Trainer(cfg)
    a.checkpointer.begin()
    b = Trainer(cfg)
    with pytest.raises(CheckpointError, match=f"in use by another training run \\(pid {os.getpid()}"):
        b.checkpointer.begin()
    a.close()
    b.checkpointer.begin()  # free again
    b.close()


# ------------------------------------------------------------------ resume with loader workers


@pytest.mark.process
def test_resume_with_loader_workers_is_bit_exact(tmp_path, digits16):
    """Opening a DataLoader with workers drew its base seed from torch's global RNG, which the
    checkpoint restores: the resumed run drew once more than the uninterrupted one, and its noise
    (hence its weights) differed."""
    from conftest import weights

    whole, part = tmp_path / "whole", tmp_path / "part"
    for run, steps in ((whole, 8), (part, 4), (part, 8)):
        code, _, err = run_bounded(train_cmd(run, digits16, steps, *WORKERS, "checkpoint.every=4"), timeout=180)
        assert code == 0, err[-2000:]
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ the same faults on 2 processes with workers

TWO = {**ENV, "ACCELERATE_USE_CPU": "1"}


@pytest.mark.slow
def test_two_processes_with_workers_fall_back_from_a_damaged_checkpoint_bit_exactly(tmp_path, digits16):
    """Rank 1's own files are damaged (its RNG state, its optimizer shard): every rank must agree to
    fall back, and the resumed run must equal one that was never interrupted."""
    from conftest import weights

    whole, part = tmp_path / "whole", tmp_path / "part"
    code, _, err = run_bounded(two_process_cmd(whole, digits16, 6, *WORKERS, "checkpoint.every=2"), 240, TWO)
    assert code == 0, err[-2000:]
    code, _, err = run_bounded(two_process_cmd(part, digits16, 4, *WORKERS, "checkpoint.every=2"), 240, TWO)
    assert code == 0, err[-2000:]
    newest = part / "checkpoints" / step_name(4)
    (newest / "random_states_1.pkl").write_bytes(b"garbage")
    code, out, err = run_bounded(two_process_cmd(part, digits16, 6, *WORKERS, "checkpoint.every=2"), 240, TWO)
    assert code == 0, err[-2000:]
    assert "random_states_1.pkl has 7 bytes" in err and "falling back" in err, err[-2000:]
    assert f"resumed from {part / 'checkpoints' / step_name(2)} at step 2" in out + err
    a, b = weights(whole), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert leftover(part) == []


@pytest.mark.slow
def test_a_second_two_process_trainer_is_refused_and_every_rank_exits(tmp_path, digits16):
    run = tmp_path / "run"
    first = subprocess.Popen(two_process_cmd(run, digits16, 100000, *WORKERS, "checkpoint.every=5"), env=TWO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not complete_checkpoints(run):
            time.sleep(0.2)
        assert complete_checkpoints(run), "the first trainer wrote no checkpoint"
        code, _, err = run_bounded(two_process_cmd(run, digits16, 100000, *WORKERS), timeout=120, env=TWO)
        assert code != 0, err[-2000:]
        assert "is in use by another training run (pid " in err, err[-2000:]
        assert first.poll() is None  # the first one trains on
        # The launcher dies hard (torch starts each rank in a session of its own): the ranks
        # are told by the kernel and end too, instead of living on as orphans.
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=60)  # the ranks hold its pipes: returns once they are gone
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    time.sleep(1)
    assert leftover(run) == []


@pytest.mark.slow
def test_ctrl_c_on_two_processes_with_workers_checkpoints_then_resumes(tmp_path, digits16):
    """Ctrl-C in a terminal reaches the launcher, both ranks and their loader workers."""
    run = tmp_path / "run"
    proc = subprocess.Popen(two_process_cmd(run, digits16, 100000, *WORKERS, "checkpoint.every=100000"), env=TWO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not list((run / "tensorboard").rglob("events.*")):
            time.sleep(0.2)
        time.sleep(3)  # some steps, with the workers running
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, err[-2000:]  # interrupted, not finished
    assert "signal 2: checkpointing" in out + err, err[-2000:]
    found = complete_checkpoints(run)
    assert found and verify(found[-1])
    time.sleep(1)
    assert leftover(run) == []
    step = layout.step_of(found[-1])
    code, out, err = run_bounded(two_process_cmd(run, digits16, step + 2, *WORKERS), timeout=180, env=TWO)
    assert code == 0 and f"resumed from {found[-1]} at step {step}" in out + err, err[-2000:]


def test_a_stop_signal_during_the_teardown_is_reported_not_fatal(tmp_path, digits16, capsys):
    """SIGTERM after the training ended (the model exported, the closing lines said) but before the
    trainer is closed: one line, the teardown finishes; the handlers are restored afterwards."""
    from bidvl.engine import Trainer

    before = signal.getsignal(signal.SIGTERM)
    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}",
                                                     "train.max_steps=2", "health.every=0"])
    trainer = Trainer(cfg)
    trainer.fit()
    os.kill(os.getpid(), signal.SIGTERM)
    trainer.close()
    assert "signal 15 after the training had ended (finished): finishing the teardown, then exiting" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == before
    assert (tmp_path / "run" / "model" / "energy.safetensors").is_file()


@pytest.mark.process
@pytest.mark.parametrize("command", [["launch/train.py"], ["-m", "bidvl", "train"]], ids=["launch", "bidvl"])
def test_ctrl_c_while_importing_is_one_line_and_exit_130(tmp_path, command):
    """Ctrl-C in the first seconds (torch is still being imported) ends the command as a Ctrl-C
    before training does: `error: interrupted`, exit 130, no traceback (before: a traceback from
    inside torch's import and death by SIGINT)."""
    proc = subprocess.Popen([sys.executable, *command, f"run.dir={tmp_path / 'run'}"], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Inside `import torch`: its C library is mapped (the Python half of the import takes another
    # second or more). A fixed delay was too short on a loaded machine (still in Python's startup).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text():
                break
        except OSError:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc, timeout=60)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert not (tmp_path / "run").exists()
