"""bidvl/run_dir.py: the one module that spells the run folder's names and reads its weights."""

import re
from pathlib import Path

import pytest
import torch

import bidvl
from bidvl import run_dir as layout
from bidvl.run_dir import RunDir


def test_every_name_of_the_run_folder(tmp_path):
    run = RunDir(tmp_path)
    assert run.config == tmp_path / "config.yaml"
    assert run.checkpoint(1000) == tmp_path / "checkpoints" / "step_00001000"
    assert run.temp_checkpoint(7) == tmp_path / "checkpoints" / ".tmp_step_00000007"
    assert (run.export, run.temp_export, run.card) == (tmp_path / "model", tmp_path / ".tmp_model",
                                                       tmp_path / "model" / "README.md")
    assert run.eval_report(12) == tmp_path / "eval" / "step_00000012.json"
    assert run.eval_cache == tmp_path / "eval" / "cache"
    assert run.tensorboard_events == tmp_path / "tensorboard" / "bidvl"
    assert (run.trackers, run.health_log, run.lock) == (tmp_path / "trackers.json", tmp_path / "health.jsonl",
                                                        tmp_path / ".lock")
    assert RunDir.of_checkpoint(run.checkpoint(3)).path == tmp_path
    assert RunDir.of_checkpoint(run.export) is None


def test_complete_checkpoints_and_layout_problems(tmp_path):
    run = RunDir(tmp_path)
    assert run.complete_checkpoints() == [] and run.temp_checkpoints() == [] and run.layout_problem() == ""
    for step in (10, 2, 300):
        run.checkpoint(step).mkdir(parents=True)
        (run.checkpoint(step) / layout.MARKER).write_text("")
    run.checkpoint(400).mkdir()  # no marker: not complete
    (run.checkpoints / "step_abc").mkdir()  # not a step folder
    run.temp_checkpoint(5).mkdir()
    assert [layout.step_of(p) for p in run.complete_checkpoints()] == [2, 10, 300]
    assert run.temp_checkpoints() == [run.temp_checkpoint(5)]
    run.eval.write_text("a file where a folder belongs")
    assert run.layout_problem().startswith(f"{run.eval} is not a folder: run.dir={tmp_path}")


def test_the_weight_files_of_each_layout(tmp_path):
    assert [p.name for p in layout.weight_files(tmp_path, "export").values()] == list(layout.EXPORT_FILES)
    files = layout.weight_files(tmp_path, "checkpoint")
    assert list(files) == ["energy", "encoder", "generator"]  # Accelerate's prepare order
    assert [p.name for p in files.values()] == ["model.safetensors", "model_1.safetensors", "model_2.safetensors"]
    assert not layout.deepspeed_layout(tmp_path)
    for engine, module in zip(layout.DEEPSPEED_FOLDERS, ({"w": torch.ones(2)},
                                                          {"encoder.a": torch.zeros(1), "generator.b": torch.ones(1)})):
        (tmp_path / engine).mkdir()
        torch.save({"module": module, "ds_version": "x"}, tmp_path / engine / layout.DEEPSPEED_STATES)
    assert layout.deepspeed_layout(tmp_path)
    nets = layout.read_deepspeed_nets(tmp_path)
    assert {k: list(v) for k, v in nets.items()} == {"energy": ["w"], "encoder": ["a"], "generator": ["b"]}
    torch.save({"module": {"other.c": torch.ones(1)}}, tmp_path / layout.DEEPSPEED_FOLDERS[1] / layout.DEEPSPEED_STATES)
    with pytest.raises(ValueError, match="'other.c' is neither encoder"):
        layout.read_deepspeed_nets(tmp_path)


def test_no_other_module_spells_a_run_folder_name():
    """The run folder's file names appear as string literals nowhere else in the package, and its
    folder names are joined onto a path nowhere else (torch hub's own checkpoints/ folder aside)."""
    files = "|".join(re.escape(n) for n in ("config.yaml", "trackers.json", "health.jsonl", ".lock", "model.safetensors",
                                            "generator_ema.safetensors", "manifest.json", "replicas.json",
                                            "train_state.json", "health.json", "samples.png"))
    spelled = re.compile(rf"[\"']({files})[\"']|(/|Path\([^)]*,)\s*[\"'](checkpoints|tensorboard|eval|model|mlruns|cache)[\"']")
    root = Path(bidvl.__file__).parent
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}" for path in sorted(root.rglob("*.py"))
             if path.name != "run_dir.py" for n, line in enumerate(path.read_text().splitlines(), 1)
             if spelled.search(re.sub(r"#.*", "", line)) and "torch.hub" not in line]
    assert found == []
