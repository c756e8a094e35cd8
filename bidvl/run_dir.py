"""The run folder: the one module that knows its names and how weights are laid out in it.

    RUN_DIR/config.yaml                          resolved config (written by the engine at start)
    RUN_DIR/checkpoints/step_00001000/           one complete checkpoint (bidvl.checkpoint writes it):
        model.safetensors, model_1, model_2      Accelerate's files, in the prepare order energy
        optimizer.bin, optimizer_1.bin, ...      net, encoder, generator; under DeepSpeed one folder
        pytorch_model/, pytorch_model_1/         per engine instead: the energy net's, then the
                                                 encoder's + generator's (`LatentNets`)
        random_states_*.pkl (weights_only)       per process
        train_state.json                         `TrainState` (JSON: nothing is unpickled)
        replicas.json                            sha256 of every rank's parameters (all equal), and
                                                 of the saved buffers (rank 0's BatchNorm statistics)
        config.yaml, generator_ema.safetensors?  the config it was trained with; the EMA
        manifest.json                            size and sha256 of every file above
        COMPLETE                                 written last: only marked folders count
    RUN_DIR/checkpoints/.tmp_step_00001000/      a checkpoint being written (or left by a kill)
    RUN_DIR/model/                               the export: {energy,encoder,generator}.safetensors,
                                                 generator_ema.safetensors?, config.yaml, the model
                                                 card README.md, samples.png, health.json
    RUN_DIR/eval/step_00001000.{json,md}         evaluation reports; eval/cache/ the FID statistics
    RUN_DIR/tensorboard/bidvl/                   TensorBoard's events (Accelerate's logging_dir)
    RUN_DIR/mlruns/                              MLflow's file store when no tracking URI is set
    RUN_DIR/trackers.json                        W&B / MLflow run ids, for a resume to continue them
    RUN_DIR/health.jsonl                         every run health check (bidvl.health)
    RUN_DIR/.lock                                held (flock) by the training run using the folder

`RunDir(path)` spells every one of these; `read_nets(folder)` reads the three nets' weights from a
checkpoint in either layout or from an export folder, and is the only reader that knows
Accelerate's file order. Nothing else in bidvl writes a run folder's names. `FolderLock` is the
flock on RUN_DIR/.lock (one training run per folder; bidvl.checkpoint.RunLock agrees on it across
ranks).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

MARKER = "COMPLETE"
CONFIG_FILE = "config.yaml"
# Accelerate names the prepared models' weight files in prepare order: energy net, encoder, generator
# (bidvl.distributed.prepare_nets). Under DeepSpeed each engine writes a folder: the energy net's,
# then the latent engine's (encoder + generator as one `LatentNets` module).
CHECKPOINT_FILES = ("model.safetensors", "model_1.safetensors", "model_2.safetensors")
DEEPSPEED_FOLDERS = ("pytorch_model", "pytorch_model_1")
DEEPSPEED_STATES = "mp_rank_00_model_states.pt"
EXPORT_FILES = ("energy.safetensors", "encoder.safetensors", "generator.safetensors")
EMA_FILE = "generator_ema.safetensors"
TRAIN_STATE_FILE = "train_state.json"
REPLICAS_FILE = "replicas.json"
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
TRACKERS_FILE = "trackers.json"
HEALTH_FILE = "health.jsonl"
# The export's card files (bidvl.model_card writes them): the card, its sample grid, the run's last
# health check, and config.json for the Hub's tools (the training config is config.yaml).
CARD_FILE, SAMPLES_FILE, HEALTH_SNAPSHOT, HUB_CONFIG = "README.md", "samples.png", "health.json", "config.json"
CARD_FILES = (CARD_FILE, SAMPLES_FILE, HEALTH_SNAPSHOT, HUB_CONFIG)
TRACKER_PROJECT = "bidvl"  # Accelerate's init_trackers project: TensorBoard's sub-folder of tensorboard/


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: str | os.PathLike) -> int:
    """The step of a `step_XXXXXXXX` checkpoint folder."""
    return int(Path(folder).name.split("_", 1)[1])


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


def is_export(folder: str | os.PathLike) -> bool:
    """An export folder (RUN_DIR/model, or a copy of it): the three nets' files and config.yaml."""
    return all((Path(folder) / name).is_file() for name in (*EXPORT_FILES, CONFIG_FILE))


class RunDir:
    """The paths of one run folder (see the module docstring). Pure names: nothing is created."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- what training writes
    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def temp_checkpoint(self, step: int) -> Path:
        return self.checkpoints / f".tmp_{step_name(step)}"

    def temp_checkpoints(self) -> list[Path]:
        """Checkpoints being written or left by a killed run."""
        return sorted(self.checkpoints.glob(".tmp_step_*")) if self.checkpoints.is_dir() else []

    def complete_checkpoints(self) -> list[Path]:
        """checkpoints/step_N folders holding the completion marker, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("step_*")
                 if p.name.split("_", 1)[1].isdigit() and is_complete(p)]
        return sorted(found, key=step_of)

    @property
    def export(self) -> Path:
        return self.path / "model"

    @property
    def temp_export(self) -> Path:
        return self.path / ".tmp_model"

    def has_export(self) -> bool:
        return all((self.export / name).is_file() for name in EXPORT_FILES)

    @property
    def card(self) -> Path:
        return self.export / CARD_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def tensorboard_events(self) -> Path:
        """Where the training curves' events go (evaluation scalars join them there)."""
        return self.tensorboard / TRACKER_PROJECT

    @property
    def trackers(self) -> Path:
        return self.path / TRACKERS_FILE

    @property
    def mlruns(self) -> Path:
        return self.path / "mlruns"

    @property
    def health_log(self) -> Path:
        return self.path / HEALTH_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    # ---- what evaluation writes
    @property
    def eval(self) -> Path:
        return self.path / "eval"

    @property
    def eval_cache(self) -> Path:
        return self.eval / "cache"

    def eval_report(self, step: int) -> Path:
        """eval/step_XXXXXXXX.json (its .md beside it)."""
        return self.eval / f"{step_name(step)}.json"

    def eval_reports(self, suffix: str = ".json") -> list[Path]:
        return sorted(self.eval.glob(f"step_*{suffix}"))

    # ---- checks
    def folders(self) -> tuple[Path, ...]:
        """The folders a run writes into: each must be a folder where it exists."""
        return (self.path, self.checkpoints, self.export, self.eval, self.tensorboard)

    def layout_problem(self) -> str:
        """Why this folder cannot hold a run ("" when it can): one of its folders is a file."""
        for path in self.folders():
            if path.exists() and not path.is_dir():
                return (f"{path} is not a folder: run.dir={self.path} needs it as one (the run folder "
                        f"holds checkpoints/, model/, eval/, tensorboard/); move it away")
        return ""

    @staticmethod
    def of_checkpoint(folder: str | os.PathLike) -> "RunDir | None":
        """The run folder a checkpoint folder (RUN_DIR/checkpoints/step_N) belongs to, else None."""
        folder = Path(folder)
        return RunDir(folder.parent.parent) if folder.parent.name == "checkpoints" else None


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """RUN_DIR/checkpoints/step_N folders holding the completion marker, oldest first."""
    return RunDir(run_dir).complete_checkpoints()


class FolderLock:
    """The exclusive flock on RUN_DIR/.lock that admits one training run per folder; the file names
    the holder. `bidvl train` takes it as soon as the config is read, before the trainer's imports
    and build, so that a second trainer on a folder in use is refused in seconds, not after them;
    `bidvl.checkpoint.RunLock` takes it (or adopts the one taken early) on the main process and
    tells the other ranks. What it guarantees across nodes: bidvl.checkpoint's docstring."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = RunDir(run_dir).lock
        self.file = None

    @property
    def held(self) -> bool:
        return self.file is not None

    def take(self) -> str:
        """Locks without waiting: "" when this object holds it now, else why not (the message
        names the folder, the holder and what to do)."""
        if self.file is not None:
            return ""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as exc:
            return f"run.dir={self.path.parent}: cannot create {self.path} ({exc.strerror})"
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return (f"run.dir={self.path.parent} is in use by another training run ({holder}; lock "
                    f"{self.path}): wait for it to end, stop it, or choose another run.dir")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        self.file = f
        return ""

    def release(self) -> None:
        """Unlocks (the file stays: removing it would let a third run lock a new file while a
        second one holds the old one)."""
        if self.file is not None:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


# ---------------------------------------------------------------- reading the nets' weights


def weight_files(folder: str | os.PathLike, kind: str) -> dict[str, Path]:
    """{"energy", "encoder", "generator"} -> the file holding each net's weights in `folder`, an
    export ("export") or a complete checkpoint ("checkpoint", DDP layout). A DeepSpeed checkpoint
    has no per-net files: `deepspeed_layout` says so and `read_nets` reads it."""
    names = EXPORT_FILES if kind == "export" else CHECKPOINT_FILES
    return dict(zip(("energy", "encoder", "generator"), (Path(folder) / n for n in names)))


def deepspeed_layout(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return not (folder / CHECKPOINT_FILES[0]).exists() and all(
        (folder / engine / DEEPSPEED_STATES).is_file() for engine in DEEPSPEED_FOLDERS)


def read_deepspeed_nets(folder: str | os.PathLike) -> dict[str, dict]:
    """The three nets' state dicts from a DeepSpeed checkpoint: each engine's
    mp_rank_00_model_states.pt (read with torch.load(weights_only=True): tensors and plain
    containers only, nothing is unpickled as code), its "module" entry; the latent engine's keys
    split at their `encoder.` / `generator.` prefix. Under bf16 these are the bf16 weights the
    engines compute with (the fp32 masters are spread over the ZeRO optimizer files;
    DeepSpeed's zero_to_fp32.py in the folder merges them)."""
    import torch

    folder = Path(folder)
    energy_path, latent_path = (folder / engine / DEEPSPEED_STATES for engine in DEEPSPEED_FOLDERS)
    energy = torch.load(energy_path, map_location="cpu", weights_only=True)["module"]
    latent = torch.load(latent_path, map_location="cpu", weights_only=True)["module"]
    nets: dict[str, dict] = {"energy": dict(energy), "encoder": {}, "generator": {}}
    for key, tensor in latent.items():
        net, _, name = key.partition(".")
        if net not in ("encoder", "generator") or not name:
            raise ValueError(f"{latent_path}: key {key!r} is neither encoder.* nor generator.*")
        nets[net][name] = tensor
    return nets
