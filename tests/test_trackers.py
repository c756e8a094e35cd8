"""log.trackers: TensorBoard and MLflow (offline, its file store in the run folder) get the scalars,
the image grids, the config and the final figures; a resume continues the same tracker runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, REPO, TINY
from bidvl.config import ConfigError, load_config

pytest.importorskip("mlflow")


def train(run, shards, steps, *extra):
    env = {**ENV, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(REPO / "launch/train.py"), *TINY, f"run.dir={run}", f"data.train={shards}",
           f"train.max_steps={steps}", "log.trackers=tensorboard,mlflow", "eval.every=2", "eval.metrics=rmse",
           "eval.max_test=64", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def hparams_sessions(run) -> list[dict]:
    """Every hparams record TensorBoard holds for the run: {hparam: value} per record."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for path in sorted(Path(run, "tensorboard").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                if data.HasField("session_start_info"):
                    info = data.session_start_info.hparams
                    sessions.append({k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                                     for k, v in info.items()})
    return sessions


def tensorboard_tags(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, set()
    for folder in {p.parent for p in Path(run, "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
        images |= set(acc.Tags()["images"])
    return scalars, images


def mlflow_runs(run) -> list[Path]:
    return [p for p in Path(run, "mlruns").glob("*/*") if (p / "meta.yaml").is_file()]


def metric_steps(mlflow_run: Path, name: str) -> list[int]:
    lines = (mlflow_run / "metrics" / name).read_text().splitlines()
    return [int(line.split()[2]) for line in lines]


@pytest.mark.slow
def test_tensorboard_and_mlflow_get_scalars_images_config_and_final_figures_once(tmp_path, digits16):
    run = tmp_path / "run"
    train(run, digits16, 4)
    # TensorBoard: scalars, both grids, and one hparams record (written at the end, with metrics).
    scalars, images = tensorboard_tags(run)
    assert {"loss/recon", "energy/gap", "eval/rmse"} <= set(scalars)
    assert {"samples", "reconstructions"} <= images
    assert {"final/loss/recon", "final/energy/gap", "final/eval/rmse"} <= set(scalars)
    sessions = hparams_sessions(run)
    assert len(sessions) == 1 and sessions[0]["objective.name"] == "bidvl"
    assert sessions[0]["train.max_steps"] == 4
    # MLflow: one run in run.dir/mlruns with the config as parameters, the scalars, the grids.
    (ml,) = mlflow_runs(run)
    assert (ml / "params" / "objective.name").read_text() == "bidvl"
    assert metric_steps(ml, "loss/recon") == [2, 4]
    assert metric_steps(ml, "final/eval/rmse") == [4]
    names = [p.name for p in (ml / "artifacts" / "images").glob("*.png")]
    assert sum(n.startswith("samples+step+4+") for n in names) == 1
    assert sum(n.startswith("reconstructions+step+2+") for n in names) == 1

    # A resume continues the same MLflow run; TensorBoard gets no hparams record at start-up
    # (before: one empty record per start) and one more when this training finishes.
    train(run, digits16, 6, "checkpoint.every=2")
    assert mlflow_runs(run) == [ml]
    assert metric_steps(ml, "loss/recon") == [2, 4, 6]
    assert metric_steps(ml, "final/eval/rmse") == [4, 6]
    sessions = hparams_sessions(run)
    assert [s["train.max_steps"] for s in sessions] == [4, 6]


def test_a_tracker_that_is_not_installed_is_named_with_its_package(monkeypatch, tmp_path):
    from bidvl import tracking

    monkeypatch.setitem(tracking.TRACKER_PACKAGES, "wandb", ("bidvl_no_such_module", "wandb"))
    cfg = load_config(None, ["log.trackers=tensorboard,wandb", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^log.trackers=tensorboard,wandb: the wandb tracker needs the "
                                          r"package wandb, which is not installed \(pip install wandb\)"):
        tracking.tracker_names(cfg)
    assert tracking.tracker_names(load_config(None, ["log.trackers=''"])) == []


def test_no_trackers_trains_and_writes_no_logs(tmp_path, digits16):
    from bidvl.engine import train as train_in_process

    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={run}", f"data.train={digits16}",
                                                     "train.max_steps=2", "log.trackers=''"])
    train_in_process(cfg)
    assert (run / "model" / "generator.safetensors").is_file()
    assert not (run / "tensorboard").exists() and not (run / "mlruns").exists()


def test_mlflow_in_one_process_writes_each_run_into_its_own_folder(tmp_path, monkeypatch):
    """The URI bidvl sets for one run is not kept for the next run of the same process; the user's is."""
    from bidvl import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking._OUR_MLFLOW_URI, raising=False)
    for name in ("a", "b"):
        cfg = load_config(None, ["log.trackers=mlflow", f"run.dir={tmp_path / name}"])
        tracking.tracker_environment(cfg, ["mlflow"])
        assert os.environ["MLFLOW_TRACKING_URI"] == (tmp_path / name / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    tracking.tracker_environment(cfg, ["mlflow"])
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
