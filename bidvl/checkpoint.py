"""The run folder: the one module that knows its names and formats.

    RUN_DIR/config.yaml                          resolved config (written by the engine at start)
    RUN_DIR/checkpoints/step_00001000/           one complete checkpoint:
        model.safetensors, model_1, model_2      Accelerate's files, in the prepare order
        optimizer.bin, optimizer_1.bin, ...      energy net, encoder, generator (DeepSpeed: one
        random_states_*.pkl (weights_only)       folder per engine instead)
        train_state.json                         `TrainState` (JSON: nothing is unpickled)
        replicas.json                            sha256 of every rank's parameters (all equal)
        config.yaml, generator_ema.safetensors?  the config it was trained with; the EMA
        COMPLETE                                 written last: only marked folders count
    RUN_DIR/checkpoints/.tmp_step_00001000/      a checkpoint being written (or left by a kill)
    RUN_DIR/model/{energy,encoder,generator}.safetensors + config.yaml   the export

Saving writes into the temp folder, fsyncs every file, writes the marker, then renames the
folder in one step, so a checkpoint exists under its final name only when it is complete. The
engine (writing, resuming, rolling back) and `bidvl.evaluation.loading` (reading) both go through
this module; nothing else spells a checkpoint path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file

from .config import Config, ConfigError, load_config, to_yaml
from .models import cpu_state_dict

MARKER = "COMPLETE"
# Accelerate names the prepared models' weight files in prepare order: energy net, encoder, generator.
CHECKPOINT_FILES = ("model.safetensors", "model_1.safetensors", "model_2.safetensors")
EXPORT_FILES = ("energy.safetensors", "encoder.safetensors", "generator.safetensors")
EMA_FILE = "generator_ema.safetensors"
TRAIN_STATE_FILE = "train_state.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used (missing, incomplete, or trained with another config);
    the message names the folder and, where it applies, the config key."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(folder: Path) -> int:
    """The step of a `step_XXXXXXXX` checkpoint folder."""
    return int(Path(folder).name.split("_", 1)[1])


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """RUN_DIR/checkpoints/step_N folders holding the completion marker, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*")
             if p.name.split("_", 1)[1].isdigit() and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


@dataclass
class TrainState:
    """Counters saved as `train_state.json` in every checkpoint."""

    step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients (and fp16 overflow)
    skipped_in_a_row: int = 0  # consecutive training steps with a skipped optimizer step
    rollbacks: int = 0
    budget_used_s: float = 0.0  # training time counted against train.time_budget_min
    lr_scale: float = 1.0  # lowered by each rollback after repeated non-finite steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        """From a checkpoint's train_state.json; missing keys keep their defaults."""
        saved = json.loads(Path(path).read_text())
        state = cls()
        for f in dataclasses.fields(cls):
            if f.name in saved:
                setattr(state, f.name, type(getattr(state, f.name))(saved[f.name]))
        return state


def replica_digest(nets: Iterable[torch.nn.Module]) -> str:
    """sha256 of every parameter of the nets: equal on all ranks, or DDP broke.

    Buffers are left out on purpose: with broadcast_buffers=False each rank keeps BatchNorm
    running statistics of its own batches (rank 0's are saved), unless model.sync_batchnorm.
    """
    h = hashlib.sha256()
    for net in nets:
        for name, t in net.named_parameters():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_compatible(cfg: Config, folder: Path) -> None:
    """A checkpoint of another architecture or data shape fails here, naming the key and both values."""
    saved = load_config(folder / "config.yaml")
    for section, keys in (("model", [f.name for f in dataclasses.fields(saved.model)]),
                          ("data", ["resolution", "channels"])):
        for key in keys:
            ours, theirs = getattr(getattr(cfg, section), key), getattr(getattr(saved, section), key)
            if ours != theirs:
                raise CheckpointError(
                    f"checkpoint {folder} was trained with {section}.{key}={theirs!r}, "
                    f"this config has {section}.{key}={ours!r}"
                )


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):  # DeepSpeed writes one folder per engine
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class Checkpointer:
    """Saves, finds and loads a run's checkpoints and writes its export; every rank calls each
    method (they synchronise), the main process alone writes our files.

    `nets` is {"energy": ..., "encoder": ..., "generator": ...} of *unwrapped* modules; Accelerate's
    save_state/load_state handle the prepared ones (weights, optimizers, RNG states per process).
    """

    def __init__(self, accelerator, cfg: Config):
        self.accelerator = accelerator
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.folder = checkpoints_dir(self.run_dir)

    def begin(self) -> None:
        """At the start of training (main process): the run folder with the resolved config, and
        no temp folders left by a killed run."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            for partial_folder in self.folder.glob(".tmp_step_*"):
                shutil.rmtree(partial_folder, ignore_errors=True)

    def save(self, state: TrainState, nets: dict, ema=None) -> Path:
        """Accelerate state + our JSON/safetensors into a temp folder, fsync, the marker, one
        rename. Keeps the newest `checkpoint.keep` complete ones (never fewer than one)."""
        acc = self.accelerator
        name = step_name(state.step)
        final, tmp = self.folder / name, self.folder / f".tmp_{name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        from accelerate.utils import gather_object

        digests = gather_object([replica_digest(nets.values())])
        acc.wait_for_everyone()
        if acc.is_main_process:
            if len(set(digests)) != 1:
                bad = [r for r, d in enumerate(digests) if d != digests[0]]
                raise RuntimeError(f"replicas diverged at step {state.step}: ranks {bad} differ from rank 0")
            (tmp / "replicas.json").write_text(json.dumps({"sha256": digests}) + "\n")
            (tmp / TRAIN_STATE_FILE).write_text(state.to_json())
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            if ema is not None:
                save_file(ema.state_dict(), str(tmp / EMA_FILE))
            _fsync_tree(tmp)
            with open(tmp / MARKER, "w") as f:
                f.write(f"{state.step}\n")
                f.flush()
                os.fsync(f.fileno())
            _replace(tmp, final)
            for old in complete_checkpoints(self.run_dir)[: -self.cfg.checkpoint.keep]:
                (old / MARKER).unlink()  # first: a half-deleted folder is never "complete"
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.run_dir)
        return found[-1] if found else None

    def find_resume(self) -> Path | None:
        """The checkpoint `checkpoint.resume` asks for: auto (newest complete, if any), none, or a
        complete checkpoint folder."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete checkpoint folder (no {MARKER} marker)"
            )
        return path

    def load(self, folder: Path, ema=None) -> TrainState:
        """Restores the prepared nets, optimizers and RNG states (Accelerate) and the EMA; returns
        the saved TrainState."""
        check_compatible(self.cfg, folder)
        self.accelerator.load_state(str(folder))  # safetensors + weights_only torch.load
        state = TrainState.read(folder / TRAIN_STATE_FILE)
        if ema is not None:
            ema.load_state_dict(load_file(str(folder / EMA_FILE)))
        return state

    def export(self, step: int, nets: dict, ema=None) -> Path:
        """The nets as RUN_DIR/model/{energy,encoder,generator}.safetensors (step in each file's
        metadata) + the resolved config, written atomically by the main process."""
        acc = self.accelerator
        out, tmp = self.run_dir / "model", self.run_dir / ".tmp_model"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, net in nets.items():  # energy, encoder, generator: EXPORT_FILES
                save_file(cpu_state_dict(net), str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
            if ema is not None:
                save_file(ema.state_dict(), str(tmp / EMA_FILE))
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            _replace(tmp, out)
        acc.wait_for_everyone()
        return out
