"""The run folder's format (bidvl.checkpoint): names, the COMPLETE marker, the train state."""

import json

import pytest

from bidvl import checkpoint
from bidvl import run_dir as layout
from bidvl.io import file_sha256
from bidvl.checkpoint import TrainState
from bidvl.run_dir import MARKER, complete_checkpoints, step_name, step_of


def test_only_marked_step_folders_count_oldest_first(tmp_path):
    folder = layout.RunDir(tmp_path).checkpoints
    for step, marked in ((30, True), (5, True), (100, False), (7, True)):
        (folder / step_name(step)).mkdir(parents=True)
        if marked:
            (folder / step_name(step) / MARKER).write_text(f"{step}\n")
    (folder / ".tmp_step_00000200").mkdir()
    (folder / "step_latest").mkdir()  # not a step number
    (folder / "step_latest" / MARKER).write_text("")
    found = complete_checkpoints(tmp_path)
    assert [step_of(p) for p in found] == [5, 7, 30]
    assert step_name(30) == "step_00000030" and found[-1].name == "step_00000030"
    assert complete_checkpoints(tmp_path / "nothing") == []


def test_train_state_round_trips_with_the_lr_scale(tmp_path):
    state = TrainState(step=12, skipped_steps=3, skipped_in_a_row=1, rollbacks=2, budget_used_s=4.5,
                       lr_scale=0.25)
    (tmp_path / "train_state.json").write_text(state.to_json())
    assert json.loads((tmp_path / "train_state.json").read_text())["lr_scale"] == 0.25
    assert TrainState.read(tmp_path / "train_state.json") == state
    # An older file without lr_scale keeps the default.
    (tmp_path / "old.json").write_text(json.dumps({"step": 4}))
    assert TrainState.read(tmp_path / "old.json") == TrainState(step=4)


def test_resume_finds_the_newest_complete_or_names_the_bad_folder(tmp_path):
    from bidvl.config import ConfigError, Config

    cfg = Config()
    cfg.run.dir = str(tmp_path)
    found = checkpoint.Checkpointer(None, cfg)  # finding needs no accelerator
    assert found.find_resume() == []  # auto, nothing saved yet
    for step in (2, 4):
        (layout.RunDir(tmp_path).checkpoints / step_name(step)).mkdir(parents=True)
        (layout.RunDir(tmp_path).checkpoints / step_name(step) / MARKER).write_text("")
    (layout.RunDir(tmp_path).checkpoints / step_name(6)).mkdir()  # incomplete: ignored
    assert [p.name for p in found.find_resume()] == [step_name(4), step_name(2)]  # newest first
    cfg.checkpoint.resume = "none"
    assert found.find_resume() == []
    cfg.checkpoint.resume = str(layout.RunDir(tmp_path).checkpoints / step_name(6))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.resume=.*step_00000006: not a complete"):
        found.find_resume()
    assert issubclass(checkpoint.CheckpointError, ConfigError)  # launch/train.py: one line, exit 2


def test_a_resume_compares_auto_keys_as_resolved_and_old_configs_as_the_old_code_ran(tmp_path):
    """objective.latent_reduction, objective.lower_latents and model.encoder_heads are `auto` per
    model.arch. A run whose config.yaml predates them ran the former maths (mean, reuse, bias):
    resuming an old ResNet run must not switch to the ResNet `auto` values silently."""
    import yaml

    from bidvl.checkpoint import CheckpointError, check_compatible
    from bidvl.config import LEGACY, load_config, to_yaml

    resnet = ["model.arch=resnet", "data.resolution=64", "data.channels=3"]
    old = tmp_path / "old"
    old.mkdir()
    written = yaml.safe_load(to_yaml(load_config(None, resnet)))
    for key in LEGACY:  # as written before these keys existed
        section, name = key.split(".")
        del written[section][name]
    (old / "config.yaml").write_text(yaml.safe_dump(written))
    with pytest.raises(CheckpointError, match=r"model.encoder_heads='bias', this config has "
                                              r"model.encoder_heads='no_bias \(auto for model.arch=resnet\)'"):
        check_compatible(load_config(None, resnet), old)
    with pytest.raises(CheckpointError, match=r"objective.latent_reduction='mean'.*checkpoint.allow_changes"):
        check_compatible(load_config(None, [*resnet, "model.encoder_heads=bias"]), old)
    as_trained = [*resnet, "model.encoder_heads=bias", "objective.latent_reduction=mean",
                  "objective.lower_latents=reuse"]
    assert check_compatible(load_config(None, as_trained), old) == []
    changes = check_compatible(load_config(None, [*resnet, "model.encoder_heads=bias",
                                                  "checkpoint.allow_changes=true"]), old)
    assert ("objective.latent_reduction", "mean", "sum_over_dims (auto for model.arch=resnet)") in changes
    assert ("objective.lower_latents", "reuse", "fresh (auto for model.arch=resnet)") in changes

    new = tmp_path / "new"  # written by this code: `auto` resolves the same on both sides
    new.mkdir()
    (new / "config.yaml").write_text(to_yaml(load_config(None, resnet)))
    assert check_compatible(load_config(None, resnet), new) == []
    # an explicit value equal to what `auto` resolved to is no change; another one is refused
    assert check_compatible(load_config(None, [*resnet, "objective.latent_reduction=sum_over_dims"]), new) == []
    with pytest.raises(CheckpointError, match=r"objective.latent_reduction='sum_over_dims', this config "
                                              r"has objective.latent_reduction='mean'"):
        check_compatible(load_config(None, [*resnet, "objective.latent_reduction=mean"]), new)
    dcgan_old = tmp_path / "dcgan"
    dcgan_old.mkdir()
    written = yaml.safe_load(to_yaml(load_config(None, [])))
    for key in LEGACY:
        section, name = key.split(".")
        del written[section][name]
    (dcgan_old / "config.yaml").write_text(yaml.safe_dump(written))
    assert check_compatible(load_config(None, []), dcgan_old) == []  # DCGAN's auto is the old maths


# ------------------------------------------------------------------ the Checkpointer in-process
# The save / load / fallback / rollback paths are also run end to end by launch/train.py subprocesses
# (tests/test_run_faults.py); these pin what each piece writes and says, in the test process, where
# the mutation run (docs/testing.md) sees them.

def _trainer(tmp_path, shards, *overrides):
    from bidvl.config import load_config
    from bidvl.engine import Trainer
    from conftest import REPO, TINY

    cfg = load_config(REPO / "configs/digits.yaml",
                      [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={shards}", "train.ema=0.5", *overrides])
    return Trainer(cfg)


def _batch():
    import torch

    return [torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1]


def _params(trainer):
    return {f"{n}.{k}": p.detach().clone() for n, net in trainer.unwrapped.items() for k, p in net.named_parameters()}


def _remanifest(folder):
    """The manifest rewritten for the folder's files as they now are (as `save` writes it: before
    the marker, and not listing itself)."""
    (folder / layout.MANIFEST).unlink()
    step = int((folder / MARKER).read_text().splitlines()[0])
    (folder / MARKER).unlink()
    checkpoint._write_manifest(folder)
    checkpoint._write_marker(folder, step)


def _same(a, b):
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_holds_every_file_in_its_manifest_and_loads_back_exactly(tmp_path, digits16):
    import torch
    from safetensors.torch import load_file

    from bidvl.config import load_config, to_yaml

    trainer = _trainer(tmp_path, digits16)
    trainer.train_step(_batch())
    trainer.state = TrainState(step=3, skipped_steps=2, skipped_in_a_row=1, rollbacks=1, budget_used_s=1.5,
                               lr_scale=0.5)
    trainer.nonfinite.start_from(trainer.state)  # (as after any replaced state: its counts from here)
    saved, ema = _params(trainer), {k: t.clone() for k, t in trainer.ema.state_dict().items()}
    folder = trainer.save_checkpoint()
    assert folder == tmp_path / "run" / "checkpoints" / "step_00000003"  # the layout other tools read
    assert not list(folder.parent.glob(".tmp_*"))
    manifest_digest = file_sha256(folder / layout.MANIFEST)
    assert (folder / MARKER).read_text() == f"3\nmanifest sha256 {manifest_digest}\n"
    files = json.loads((folder / layout.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {layout.MANIFEST, MARKER}
    assert {*layout.CHECKPOINT_FILES, "replicas.json", layout.TRAIN_STATE_FILE, "config.yaml",
            layout.EMA_FILE} <= set(files)
    for name, entry in files.items():
        assert entry == {"size": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
    assert checkpoint.verify(folder) is True
    state = TrainState.read(folder / layout.TRAIN_STATE_FILE)
    assert state == TrainState(step=3, skipped_steps=2, skipped_in_a_row=1, rollbacks=1, budget_used_s=1.5,
                               lr_scale=0.5, world_size=1)
    assert json.loads((folder / "replicas.json").read_text()) == {
        "sha256": [checkpoint.replica_digest(trainer.unwrapped.values())],
        "buffers_sha256": checkpoint.buffer_digest(trainer.unwrapped.values())}
    assert (folder / "config.yaml").read_text() == to_yaml(trainer.cfg)
    assert load_config(folder / "config.yaml") == trainer.cfg
    assert all(torch.equal(load_file(folder / layout.EMA_FILE)[k], t) for k, t in ema.items())

    trainer.train_step(_batch())  # moves the nets and the EMA away from the checkpoint
    assert not _same(saved, _params(trainer))
    assert trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema) == state
    assert _same(saved, _params(trainer))
    assert all(torch.equal(trainer.ema.state_dict()[k], t) for k, t in ema.items())
    trainer.close()


def test_only_the_newest_checkpoint_keep_complete_ones_are_kept(tmp_path, digits16):
    trainer = _trainer(tmp_path, digits16, "checkpoint.keep=2")
    for step in (1, 2, 3):
        trainer.state.step = step
        trainer.save_checkpoint()
        assert step_of(complete_checkpoints(tmp_path / "run")[-1]) == step
    assert [step_of(p) for p in complete_checkpoints(tmp_path / "run")] == [2, 3]
    folders = sorted(p.name for p in layout.RunDir(tmp_path / "run").checkpoints.iterdir())
    assert folders == [step_name(2), step_name(3)]
    trainer.cfg.checkpoint.keep = 1
    trainer.state.step = 4
    trainer.save_checkpoint()
    assert [step_of(p) for p in complete_checkpoints(tmp_path / "run")] == [4]
    trainer.state.step = 4  # the same step again (a rollback that saves): replaced, still one
    trainer.save_checkpoint()
    assert [step_of(p) for p in complete_checkpoints(tmp_path / "run")] == [4]
    trainer.close()


def test_verify_names_the_first_bad_file_and_how_it_is_bad(tmp_path, digits16):
    from bidvl.checkpoint import DamagedCheckpoint, verify

    trainer = _trainer(tmp_path, digits16)
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    trainer.close()
    weights = folder / "model_1.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1])
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: model_1.safetensors has {len(data) - 1} "
                                                rf"bytes, {len(data)} were written \(truncated or replaced\)$"):
        verify(folder)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: model_1.safetensors does not match the "
                                                r"sha256 written with it \(corrupted\)$"):
        verify(folder)
    weights.unlink()
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: model_1.safetensors is missing$"):
        verify(folder)
    weights.write_bytes(data)
    assert verify(folder) is True
    manifest = folder / layout.MANIFEST
    good = manifest.read_text()
    for bad in ("{not json", json.dumps({"file": {}}), json.dumps({"files": {"a": {"size": 1}}}),
                json.dumps({"files": {"a": {"size": "x", "sha256": "y"}}}), json.dumps({"files": ["a"]})):
        manifest.write_text(bad)  # edited after the marker: the marker's digest catches it
        with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: manifest.json does not match the "
                                                    r"sha256 its COMPLETE marker records \(edited or corrupted\)$"):
            verify(folder)
        checkpoint._write_marker(folder, 1)  # written so: the manifest itself is read and refused
        with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: unreadable manifest.json \("):
            verify(folder)
    manifest.write_text(good)
    checkpoint._write_marker(folder, 1)
    assert verify(folder) is True
    manifest.unlink()
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: manifest.json is missing"):
        verify(folder)
    (folder / MARKER).write_text("1\n")  # as versions before manifests wrote it
    assert verify(folder) is False  # not verifiable, not damaged


def test_resume_and_rollback_fall_back_past_a_damaged_checkpoint_or_stop_naming_it(tmp_path, digits16, capsys):
    from bidvl.checkpoint import DamagedCheckpoint

    import torch

    trainer = _trainer(tmp_path, digits16)
    trainer.train_step(_batch())
    trainer.state.step = 1
    first = trainer.save_checkpoint()
    at_first, ema_at_first = _params(trainer), {k: t.clone() for k, t in trainer.ema.state_dict().items()}
    trainer.train_step(_batch())
    trainer.state.step = 2
    second = trainer.save_checkpoint()
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    capsys.readouterr()
    for load in (trainer.checkpointer.resume, trainer.checkpointer.rollback):
        folder, state = load(trainer.unwrapped, trainer.ema)
        assert folder == first and state.step == 1 and _same(at_first, _params(trainer))
        assert all(torch.equal(trainer.ema.state_dict()[k], t) for k, t in ema_at_first.items())
        trainer.train_step(_batch())  # away again, for the next loader
        err = capsys.readouterr().err
        assert f"warning: checkpoint {second}: model.safetensors has" in err
        assert "falling back to the previous complete checkpoint (checkpoint.on_damaged=fallback)" in err
    trainer.cfg.checkpoint.on_damaged = "stop"
    for load in (trainer.checkpointer.resume, trainer.checkpointer.rollback):
        with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {second}: model.safetensors has"):
            load(trainer.unwrapped, trainer.ema)
    trainer.cfg.checkpoint.on_damaged = "fallback"
    trainer.cfg.checkpoint.resume = str(second)  # a named checkpoint: no fallback to another one
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {second}: model.safetensors has"):
        trainer.checkpointer.resume(trainer.unwrapped, trainer.ema)
    trainer.cfg.checkpoint.resume = "auto"
    (first / "train_state.json").write_text("{}")
    with pytest.raises(DamagedCheckpoint, match=rf"^every complete checkpoint in {first.parent} is damaged \(newest: "
                                                rf"checkpoint {second}: model.safetensors has .*\); move them away"):
        trainer.checkpointer.resume(trainer.unwrapped, trainer.ema)
    trainer.cfg.checkpoint.resume = "none"
    assert trainer.checkpointer.resume(trainer.unwrapped, trainer.ema) is None
    trainer.close()


def test_a_load_checks_the_weights_against_replicas_json_and_reports_changes(tmp_path, digits16, capsys):
    from bidvl.checkpoint import DamagedCheckpoint

    trainer = _trainer(tmp_path, digits16)
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    capsys.readouterr()
    trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    assert capsys.readouterr().err == ""  # same config, same world size: nothing to say
    state = json.loads((folder / layout.TRAIN_STATE_FILE).read_text())
    (folder / layout.TRAIN_STATE_FILE).write_text(json.dumps({**state, "world_size": 4}))
    _remanifest(folder)  # a consistent checkpoint trained on 4 processes
    trainer.cfg.log.every, trainer.cfg.log.num_images = 7, 9
    trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    err = capsys.readouterr().err
    assert f"resuming {folder} with a changed config:\n  log.every: 2 -> 7\n  log.num_images: 4 -> 9\n" in err
    assert f"warning: {folder} was trained on 4 processes, this run has 1: the global batch becomes 1 x" in err
    (folder / "replicas.json").write_text(json.dumps({"sha256": ["0" * 64]}) + "\n")
    _remanifest(folder)
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: the loaded parameters do not match the "
                                                r"digest in replicas.json$"):
        trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    params = checkpoint.replica_digest(trainer.unwrapped.values())
    (folder / "replicas.json").write_text(json.dumps({"sha256": [params], "buffers_sha256": "0" * 64}) + "\n")
    _remanifest(folder)  # e.g. BatchNorm statistics that were not loaded
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: the loaded buffers \(BatchNorm statistics\) "
                                                r"do not match the digest in replicas.json$"):
        trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    (folder / "replicas.json").write_text("[]")
    _remanifest(folder)
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: cannot be loaded \(TypeError: "):
        trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    (folder / layout.MANIFEST).unlink()  # its marker records the manifest: damaged, not "older"
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: manifest.json is missing \(its COMPLETE "
                                                r"marker records one\)$"):
        trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    (folder / MARKER).write_text(f"{step_of(folder)}\n")  # an older checkpoint: loads with a warning
    digest = checkpoint.replica_digest(trainer.unwrapped.values())
    (folder / "replicas.json").write_text(json.dumps({"sha256": [digest]}))
    trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    assert (f"warning: checkpoint {folder} has no manifest.json (written by an older version): its files cannot "
            "be verified") in capsys.readouterr().err
    trainer.close()


def test_a_failed_write_names_the_error_and_leaves_the_complete_checkpoints(tmp_path, digits16, monkeypatch):
    import errno

    from bidvl.checkpoint import CheckpointError

    trainer = _trainer(tmp_path, digits16)
    trainer.state.step = 1
    good = trainer.save_checkpoint()
    files = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    run_ckpts = layout.RunDir(tmp_path / "run").checkpoints

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/x/optimizer.bin")

    monkeypatch.setattr(trainer.accelerator, "save_state", full)
    trainer.state.step = 2
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint step_00000002: ENOSPC \(No space left on "
                                              rf"device\) at /mnt/x/optimizer.bin; its temp folder was removed; "
                                              rf"the complete checkpoints in "
                                              rf"{run_ckpts} are untouched$"):
        trainer.save_checkpoint()
    assert [p.name for p in run_ckpts.iterdir()] == [good.name]  # the temp folder removed
    monkeypatch.undo()

    def broken(folder):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpoint, "_write_manifest", broken)
    with pytest.raises(CheckpointError, match=rf"^cannot write checkpoint step_00000002: EIO \(Input/output error\) "
                                              rf"at {run_ckpts / '.tmp_step_00000002'}; its temp folder was removed; the complete"):
        trainer.save_checkpoint()
    assert [p.name for p in run_ckpts.iterdir()] == [good.name]  # no temp folder left, the good one kept
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == files
    trainer.close()


def test_the_run_lock_admits_one_run_names_the_holder_and_is_freed_by_release(tmp_path, digits16):
    import os
    import socket
    from types import SimpleNamespace

    from bidvl.checkpoint import CheckpointError, RunLock

    main = SimpleNamespace(is_main_process=True, num_processes=1)
    first, second = RunLock(main, tmp_path / "run"), RunLock(main, tmp_path / "run")
    first.acquire()
    holder = (tmp_path / "run" / ".lock").read_text()
    assert holder.startswith(f"pid {os.getpid()} on host {socket.gethostname()}, since ")
    with pytest.raises(CheckpointError, match=rf"^run.dir={tmp_path / 'run'} is in use by another training run "
                                              rf"\(pid {os.getpid()} on host .*; lock {tmp_path / 'run' / '.lock'}\)"):
        second.acquire()
    assert (tmp_path / "run" / ".lock").read_text() == holder  # the refused run did not overwrite it
    first.release()
    first.release()  # twice is harmless
    second.acquire()
    second.release()
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=rf"^run.dir={tmp_path / 'file' / 'run'}: cannot create "):
        RunLock(main, tmp_path / "file" / "run").acquire()

    trainer = _trainer(tmp_path, digits16)  # begin(): locks, then removes what a killed run left
    partial = layout.RunDir(tmp_path / "run").checkpoints / ".tmp_step_00000009"
    partial.mkdir(parents=True)
    trainer.state.step = 1
    kept = trainer.save_checkpoint()
    trainer.checkpointer.begin()
    assert not partial.exists() and is_complete_folder(kept)
    with pytest.raises(CheckpointError, match="is in use by another training run"):
        RunLock(main, tmp_path / "run").acquire()
    trainer.close()  # releases
    RunLock(main, tmp_path / "run").acquire()


def is_complete_folder(folder):
    return layout.is_complete(folder) and checkpoint.verify(folder)


def test_the_export_writes_each_net_with_its_step_atomically(tmp_path, digits16):
    import torch
    from safetensors import safe_open

    from bidvl.config import to_yaml

    trainer = _trainer(tmp_path, digits16)
    trainer.train_step(_batch())
    seen = []

    def card(folder):
        seen.append(folder)
        (folder / "README.md").write_text("card")

    (tmp_path / "run" / ".tmp_model").mkdir(parents=True)
    (tmp_path / "run" / ".tmp_model" / "left.txt").write_text("by an export that was killed")
    out = trainer.checkpointer.export(7, trainer.unwrapped, trainer.ema, extra=card)
    assert out == tmp_path / "run" / "model" and seen == [tmp_path / "run" / ".tmp_model"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*layout.EXPORT_FILES, layout.EMA_FILE,
                                                            "config.yaml", "README.md"])
    for name, net in trainer.unwrapped.items():
        with safe_open(out / f"{name}.safetensors", "pt") as f:
            assert f.metadata() == {"step": "7"}
            state = net.state_dict()
            assert set(f.keys()) == set(state)
            assert all(torch.equal(f.get_tensor(k), state[k]) for k in f.keys())
    assert (out / "config.yaml").read_text() == to_yaml(trainer.cfg)
    (out / "stale.txt").write_text("from the export before")
    trainer.checkpointer.export(8, trainer.unwrapped)  # replaces the whole folder
    assert sorted(p.name for p in out.iterdir()) == sorted([*layout.EXPORT_FILES, "config.yaml"])
    assert not (tmp_path / "run" / ".tmp_model").exists()
    trainer.close()
    fresh = _trainer(tmp_path / "fresh", digits16)  # nothing written in its run.dir yet
    assert fresh.checkpointer.export(0, fresh.unwrapped).is_dir()
    fresh.close()


def test_a_resume_refuses_other_nets_and_other_maths_but_allows_the_rest(tmp_path):
    from bidvl.checkpoint import CheckpointError, check_compatible, config_changes
    from bidvl.config import load_config, to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(load_config(None, ["model.energy_width=16"])))

    def check(*overrides):
        return check_compatible(load_config(None, ["model.energy_width=16", *overrides]), tmp_path)

    assert check() == []
    assert check("train.energy_optim.lr=0.001", "log.every=7") == [
        ("log.every", load_config(None, []).log.every, 7),
        ("train.energy_optim.lr", load_config(None, []).train.energy_optim.lr, 0.001)]
    for fixed in ("model.energy_width=8", "data.resolution=64", "data.channels=3"):
        key, value = fixed.split("=")
        for allow in ("false", "true"):
            with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path} was trained with {key}=.*, this config "
                                                      rf"has {key}={value}$"):
                check(fixed, f"checkpoint.allow_changes={allow}")
    for maths in ("objective.r_basic=0.5", "train.energy_optim.betas=[0.5,0.9]"):
        key = maths.split("=")[0]
        with pytest.raises(CheckpointError, match=rf"^checkpoint {tmp_path} was trained with {key}=.*: a change to "
                                                  r"the maths of a resumed run \(set checkpoint.allow_changes=true"):
            check(maths)
        assert [c[0] for c in check(maths, "checkpoint.allow_changes=true")] == ["checkpoint.allow_changes", key]
    with pytest.raises(CheckpointError, match=r"with model.energy_width=16, this config has model.energy_width=8$"):
        check("objective.r_basic=0.5", "model.energy_width=8")  # the nets are named first
    saved, now = load_config(None, []), load_config(None, ["log.every=7"])
    now.data.train = "x"
    assert config_changes(saved, now) == [("data.train", saved.data.train, "x"), ("log.every", saved.log.every, 7)]


def test_train_state_and_replica_digest_details():
    import torch

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.json"
        path.write_text(json.dumps({"step": 4.0, "lr_scale": 1, "rollbacks": "2", "unknown": 1}))
        read = TrainState.read(path)
    assert read == TrainState(step=4, lr_scale=1.0, rollbacks=2)
    assert type(read.step) is int and type(read.lr_scale) is float and type(read.rollbacks) is int

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    twin = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    twin.load_state_dict(net.state_dict())
    digest = checkpoint.replica_digest([net])
    assert len(digest) == 64 and digest == checkpoint.replica_digest([twin])
    twin[1].running_mean += 1  # buffers are each rank's own (broadcast_buffers=False): not compared
    assert checkpoint.replica_digest([twin]) == digest
    with torch.no_grad():
        twin[0].bias[1] += 1e-6
    assert checkpoint.replica_digest([twin]) != digest
    assert checkpoint.replica_digest([net, twin]) != checkpoint.replica_digest([twin, net])  # order counts
    renamed = torch.nn.Sequential()
    renamed.add_module("conv", net[0])
    renamed.add_module("1", net[1])
    assert checkpoint.replica_digest([renamed]) != digest  # names count, not only values


def test_the_run_lock_on_several_processes_follows_the_main_processs_answer(tmp_path, monkeypatch):
    """Only the main process locks; the others take its answer from a broadcast (here a stand-in for
    accelerate's, which needs a process group), so every rank fails or none does."""
    import re
    from types import SimpleNamespace

    from bidvl.checkpoint import CheckpointError, RunLock

    sent = []

    def broadcast(objects):
        sent.append(list(objects))
        return main_answer if not rank.is_main_process else objects

    monkeypatch.setattr(checkpoint, "broadcast_object_list", broadcast)
    rank = SimpleNamespace(is_main_process=False, num_processes=2)
    main_answer = ["run.dir=x is in use by another training run (pid 1 on host h; lock x/.lock)"]
    with pytest.raises(CheckpointError, match=r"^run.dir=x is in use by another training run \(pid 1 on host h"):
        RunLock(rank, tmp_path / "run").acquire()
    assert not (tmp_path / "run" / ".lock").exists()  # a non-main rank never touches the lock file
    main_answer = [""]
    RunLock(rank, tmp_path / "run").acquire()  # the main process holds it: this rank goes on
    assert sent == [[""], [""]]  # each rank offers its (empty) answer to the broadcast
    rank.is_main_process = True
    lock = RunLock(rank, tmp_path / "a" / "b" / "run")  # parents created
    lock.acquire()
    assert sent[-1] == [""] and len(sent) == 3
    assert re.fullmatch(r"pid \d+ on host \S+, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+\n",
                        (tmp_path / "a" / "b" / "run" / ".lock").read_text())
    (tmp_path / "a" / "b" / "run" / ".lock").write_text("")  # a holder that wrote nothing yet
    with pytest.raises(CheckpointError, match=r"in use by another training run \(another process; lock "):
        RunLock(SimpleNamespace(is_main_process=True, num_processes=1), tmp_path / "a" / "b" / "run").acquire()
    assert len(sent) == 3  # one process: nothing broadcast
    lock.release()


def test_write_errors_name_the_errno_or_the_exception(tmp_path):
    from bidvl.checkpoint import _write_error

    tmp = tmp_path / "checkpoints" / ".tmp_step_00000005"
    assert _write_error(OSError(9999, "odd"), tmp, tmp_path).startswith("cannot write checkpoint step_00000005: "
                                                                         "9999 (odd) at ")
    assert _write_error(OSError("no errno"), tmp, tmp_path) == (
        f"cannot write checkpoint step_00000005: OSError (no errno) at {tmp}; its temp folder was removed; "
        f"the complete checkpoints in "
        f"{tmp_path / 'checkpoints'} are untouched")
    assert _write_error(PermissionError(13, "Permission denied", "/x"), tmp, tmp_path).startswith(
        "cannot write checkpoint step_00000005: EACCES (Permission denied) at /x;")


def test_begin_write_config_and_a_load_error_without_a_message(tmp_path, digits16, monkeypatch):
    from bidvl.checkpoint import DamagedCheckpoint
    from bidvl.config import to_yaml

    trainer = _trainer(tmp_path, digits16)
    stray = layout.RunDir(tmp_path / "run").checkpoints / ".tmp_step_00000003"
    stray.parent.mkdir(parents=True)
    stray.write_text("a file where a temp folder would be")
    trainer.checkpointer.begin()  # what it cannot remove does not stop the run
    trainer.checkpointer.write_config()
    assert (tmp_path / "run" / "config.yaml").read_text() == to_yaml(trainer.cfg)
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    for exc, shown in ((RuntimeError(), "RuntimeError: "),
                       (RuntimeError("first line\nsecond"), "RuntimeError: first line")):
        def fail(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(trainer.accelerator, "load_state", fail)
        with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: cannot be loaded \({shown}\)$"):
            trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    trainer.close()


def test_step_folders_sort_by_number_and_copies_do_not_count(tmp_path):
    folder = layout.RunDir(tmp_path).checkpoints
    for name in (step_name(99_999_999), step_name(100_000_000), step_name(7), "step_00000009_backup",
                 "step_00000005_1"):  # copies a user made
        (folder / name).mkdir(parents=True)
        (folder / name / MARKER).write_text("")
    assert step_name(100_000_000) == "step_100000000"  # past 10^8 steps the names are longer
    assert [step_of(p) for p in complete_checkpoints(tmp_path)] == [7, 99_999_999, 100_000_000]


def test_a_save_replaces_a_stale_temp_folder_and_refuses_diverged_replicas(tmp_path, digits16, monkeypatch):
    trainer = _trainer(tmp_path, digits16)
    stale = layout.RunDir(tmp_path / "run").checkpoints / ".tmp_step_00000001"
    stale.mkdir(parents=True)
    (stale / "from_a_killed_save.bin").write_text("x")
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    assert not (folder / "from_a_killed_save.bin").exists() and checkpoint.verify(folder)
    digest = checkpoint.replica_digest(trainer.unwrapped.values())
    monkeypatch.setattr(checkpoint, "gather_object", lambda objects: [digest, "0" * 64, digest, "1" * 64])
    trainer.state.step = 2
    with pytest.raises(RuntimeError, match=r"^replicas diverged at step 2: ranks \[1, 3\] differ from rank 0$"):
        trainer.save_checkpoint()
    assert [step_of(p) for p in complete_checkpoints(tmp_path / "run")] == [1]
    trainer.close()


@pytest.mark.parametrize("key,value,expected", [
    ("step", -5, r"step=-5, expected a value in \[0, 2147483647\]"),
    ("step", 10**12, r"step=1000000000000, expected a value in"),
    ("step", "seven", r"step='seven', expected an integer"),
    ("step", 4.5, r"step=4.5, expected an integer"),
    ("step", True, r"step=True, expected an integer"),
    ("budget_used_s", float("nan"), r"budget_used_s=nan, expected a value in \[0.0, 10000000000.0\]"),
    ("lr_scale", 0.0, r"lr_scale=0.0, expected a value in"),
    ("lr_scale", 2.0, r"lr_scale=2.0, expected a value in"),
    ("noise_seed", -2, r"noise_seed=-2, expected a value in \[-1, "),
    ("health", "great", r"health='great', expected '', healthy, warning or unhealthy"),
])
def test_train_state_values_out_of_range_are_named(tmp_path, key, value, expected):
    """train_state.json is range-checked when read (a checkpoint holding such a value is damaged:
    Checkpointer.load falls back past it); a good file reads back as written."""
    from bidvl.checkpoint import TrainState

    path = tmp_path / "train_state.json"
    good = TrainState(step=12, budget_used_s=3.5, lr_scale=0.25, health="warning", noise_seed=-1)
    path.write_text(good.to_json())
    assert TrainState.read(path) == good
    path.write_text(json.dumps({**json.loads(good.to_json()), key: value}))
    with pytest.raises(ValueError, match=rf"^{path}: {expected}"):
        TrainState.read(path)


def test_a_random_state_file_that_does_not_load_is_damage_not_a_silent_inexact_resume(tmp_path, digits16):
    """Accelerate skips a random-state file it cannot load (an INFO log line) and the resume would
    go on with whatever RNG state the process had. Even with a manifest that matches (written so),
    the load is a DamagedCheckpoint naming the file; a good one restores the saved RNG state."""
    import torch

    from bidvl.checkpoint import DamagedCheckpoint

    trainer = _trainer(tmp_path, digits16)
    trainer.state.step = 1
    torch.manual_seed(123)
    expected = torch.get_rng_state()
    folder = trainer.save_checkpoint()
    torch.manual_seed(7)
    trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    assert torch.equal(torch.get_rng_state(), expected)
    (folder / "random_states_0.pkl").write_bytes(b"not a pickle of random states")
    _remanifest(folder)
    with pytest.raises(DamagedCheckpoint, match=rf"^checkpoint {folder}: random_states_0.pkl could not be loaded "
                                                r"\(Accelerate skips a random-state file it cannot read\): the "
                                                r"resume would not be exact$"):
        trainer.checkpointer.load(folder, trainer.unwrapped, trainer.ema)
    trainer.close()


def test_a_broken_run_folder_layout_is_refused_at_the_start_naming_the_path(tmp_path, digits16):
    from bidvl.checkpoint import CheckpointError

    trainer = _trainer(tmp_path, digits16)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "checkpoints").rmdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'run' / 'checkpoints'} is not a folder: run.dir="):
        trainer.checkpointer.begin()
    trainer.close(synchronise=False)


def test_a_resume_that_changes_the_data_order_says_so(tmp_path, digits16, capsys):
    trainer = _trainer(tmp_path, digits16)
    trainer.state.step = 1
    folder = trainer.save_checkpoint()
    capsys.readouterr()
    trainer.cfg.train.batch_size = 8
    trainer.checkpointer._report_changes(folder, [("train.batch_size", 16, 8)], 1)
    assert "warning: train.batch_size changed: the data order from here differs" in capsys.readouterr().err
    trainer.close()


def test_the_trainer_resolves_its_config_once_and_leaves_the_callers_alone(tmp_path, digits16):
    """config.yaml says what ran: no `auto` value in it but the two modes (checkpoint.resume,
    log.progress); the config object the caller passed is not changed."""
    import yaml

    from bidvl.config import flatten, load_config
    from bidvl.engine import Trainer
    from conftest import REPO, TINY

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"])
    trainer = Trainer(cfg)
    try:
        assert (cfg.train.mixed_precision, cfg.model.init, cfg.objective.latent_reduction) == ("auto",) * 3
        assert (trainer.cfg.train.mixed_precision, trainer.cfg.model.init) == ("no", "normal")
        trainer.checkpointer.begin()  # (the run folder, locked)
        trainer.checkpointer.write_config()
        written = flatten(yaml.safe_load(layout.RunDir(tmp_path / "run").config.read_text()))
        assert sorted(k for k, v in written.items() if v == "auto") == ["checkpoint.resume", "log.progress"]
        assert written["objective.latent_reduction"] == "mean" and written["model.encoder_heads"] == "bias"
    finally:
        trainer.close()
