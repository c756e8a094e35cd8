"""The run folder's format (bidvl.checkpoint): names, the COMPLETE marker, the train state."""

import json

import pytest

from bidvl import checkpoint
from bidvl.checkpoint import MARKER, TrainState, complete_checkpoints, step_name, step_of


def test_only_marked_step_folders_count_oldest_first(tmp_path):
    folder = checkpoint.checkpoints_dir(tmp_path)
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
        (checkpoint.checkpoints_dir(tmp_path) / step_name(step)).mkdir(parents=True)
        (checkpoint.checkpoints_dir(tmp_path) / step_name(step) / MARKER).write_text("")
    (checkpoint.checkpoints_dir(tmp_path) / step_name(6)).mkdir()  # incomplete: ignored
    assert [p.name for p in found.find_resume()] == [step_name(4), step_name(2)]  # newest first
    cfg.checkpoint.resume = "none"
    assert found.find_resume() == []
    cfg.checkpoint.resume = str(checkpoint.checkpoints_dir(tmp_path) / step_name(6))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint.resume=.*step_00000006: not a complete"):
        found.find_resume()
    assert issubclass(checkpoint.CheckpointError, ConfigError)  # launch/train.py: one line, exit 2


def test_a_resume_compares_auto_keys_as_resolved_and_old_configs_as_the_old_code_ran(tmp_path):
    """objective.latent_reduction, objective.lower_latents and model.encoder_heads are `auto` per
    model.arch. A run whose config.yaml predates them ran the former maths (mean, reuse, bias):
    resuming an old ResNet run must not switch to the ResNet `auto` values silently."""
    import yaml

    from bidvl.checkpoint import LEGACY, CheckpointError, check_compatible
    from bidvl.config import load_config, to_yaml

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
