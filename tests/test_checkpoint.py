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
