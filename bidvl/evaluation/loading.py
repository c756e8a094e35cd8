"""Run folder -> (config, the three nets, step): from the export or a complete checkpoint.

    run = load_run("runs/cifar10")                      # export if present, else latest checkpoint
    run = load_run("runs/cifar10", checkpoint="latest") # latest complete checkpoint
    run = load_run("runs/cifar10", checkpoint="final")  # the export only
    run = load_run("runs/cifar10", checkpoint=40000)    # checkpoints/step_00040000
    run = load_run("runs/cifar10/model")                # the export folder alone (copied elsewhere)
    run = load_run("runs/cifar10", ema=False)           # the trained generator, not its EMA
    run.cfg, run.nets.energy_net, run.step, run.source, run.generator  # "ema" | "trained"

Weights are read with safetensors, never a pickle: the export (its `step` metadata is the step)
or a complete checkpoint, whose files `bidvl.run_dir` names (the one module that knows Accelerate's
file order). A checkpoint of a DeepSpeed run holds each engine's weights in a torch file instead,
read with `torch.load(weights_only=True)` (tensors and plain containers only). Only complete
checkpoints count. The config is `RUN_DIR/config.yaml` (or the export's copy).

The generator: a run trained with train.ema > 0 also writes `generator_ema.safetensors` (same keys
as the generator's state dict) into the export and every checkpoint. `ema=None` (the default)
loads it into the generator when the folder has one, `ema=False` keeps the trained generator,
`ema=True` requires it. `run.generator` says which was loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from bidvl.config import Config, ConfigError, flatten, load_config, resolve
from bidvl.errors import BidvlError
from bidvl.models import build_nets
from bidvl.models.registry import Nets
from bidvl.run_dir import (CONFIG_FILE, EMA_FILE, EXPORT_FILES, MARKER, RunDir, deepspeed_layout, is_complete, is_export,
                           read_deepspeed_nets, step_of, weight_files)


class EvalError(BidvlError, ValueError):
    """A run folder, weights file, data folder or option is unusable; the message names it."""


@dataclass
class LoadedRun:
    cfg: Config
    nets: Nets
    step: int
    source: Path  # the export folder or the checkpoint folder the weights came from
    kind: str  # "export" | "checkpoint"
    generator: str = "trained"  # "ema" (generator_ema.safetensors) | "trained"


def own_file(folder: Path, name: str) -> Path:
    """`folder / name`, refused (EvalError) when it is a link to a file outside `folder`: a model
    folder from elsewhere cannot make bidvl read files it does not hold."""
    path = Path(folder) / name
    if path.is_symlink() and not path.resolve().is_relative_to(Path(folder).resolve()):
        raise EvalError(f"{path} is a link to {path.resolve()}, outside {folder}: refused")
    return path


def _export_step(export: Path) -> int:
    path = own_file(export, EXPORT_FILES[0])
    try:
        with safe_open(str(path), framework="pt") as f:
            step = (f.metadata() or {}).get("step", "")
    except Exception as exc:  # safetensors raises its own error types for files that are not its
        raise EvalError(f"{path}: not a readable safetensors file ({_first(exc)})") from None
    if not step.isdigit():
        raise EvalError(f"{export / EXPORT_FILES[0]}: no 'step' in its metadata")
    return int(step)


def resolve_weights(run_dir: str | os.PathLike, checkpoint: str | int | None = None
                    ) -> tuple[str, Path, int]:
    """(kind, folder, step) of the weights to evaluate; see the module docstring for `checkpoint`.

    `checkpoint` may also be the path of a checkpoint folder. `run_dir` may also be an export folder
    (RUN_DIR/model) alone; it holds no checkpoints, so `checkpoint` must then be None or final."""
    run = RunDir(run_dir)
    run_dir = run.path
    if not run_dir.is_dir():
        raise EvalError(f"run folder {run_dir} does not exist")
    if is_export(run_dir) and not run.checkpoints.is_dir():
        if checkpoint not in (None, "", "final"):
            raise EvalError(f"--checkpoint {checkpoint}: {run_dir} is an exported model folder; it "
                            f"holds the final weights only (give the run folder for checkpoints)")
        return "export", run_dir, _export_step(run_dir)
    found = run.complete_checkpoints()
    where = (f"{run_dir} has no exported model ({run.export}/{{energy,encoder,generator}}"
             f".safetensors) and no complete checkpoint ({run.checkpoints}/step_*/"
             f"{MARKER}); train it first with `bidvl train run.dir={run_dir}`")
    if checkpoint in (None, ""):
        if run.has_export():
            return "export", run.export, _export_step(run.export)
        if not found:
            raise EvalError(where)
        checkpoint = "latest"
    checkpoint = str(checkpoint)
    if checkpoint == "final":
        if not run.has_export():
            raise EvalError(
                f"--checkpoint final: {run.export} has no export "
                f"({', '.join(EXPORT_FILES)}); the run has not finished"
                + (f"; complete checkpoints: {', '.join(p.name for p in found)}" if found else "")
            )
        return "export", run.export, _export_step(run.export)
    if checkpoint == "latest":
        if not found:
            raise EvalError(where)
        path = found[-1]
    elif checkpoint.isdigit():
        path = run.checkpoint(int(checkpoint))
        if path not in found:
            have = ", ".join(p.name for p in found) or "none"
            raise EvalError(f"--checkpoint {checkpoint}: {path} is not a complete checkpoint "
                            f"(complete ones: {have})")
    else:
        path = Path(checkpoint)
        if not is_complete(path):
            raise EvalError(f"--checkpoint {checkpoint}: expected latest, final, a step number or "
                            f"a checkpoint folder with a {MARKER} marker")
    return "checkpoint", path, step_of(path)


def run_config(run_dir: str | os.PathLike) -> Config:
    """The run's config (config.yaml, or the export's copy), resolved (bidvl.config.resolve): a
    config.yaml that predates a key gets the value the code before the key ran."""
    run = RunDir(run_dir)
    for path in (run.config, run.export / CONFIG_FILE):
        if path.is_file():
            try:
                written = flatten(yaml.safe_load(path.read_text()) or {})
                return resolve(load_config(path), written=written, launcher=False)
            except (ConfigError, yaml.YAMLError) as exc:
                raise EvalError(f"{path}: {exc}") from None
    raise EvalError(f"{run.config} is missing: {run.path} is not a run folder")


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors, the path checked (inside its folder, present, readable)."""
    path = own_file(path.parent, path.name)
    if not path.is_file():
        raise EvalError(f"weights file {path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise EvalError(f"{path}: not a readable safetensors file ({_first(exc)})") from None


def net_states(folder: Path, kind: str, ema: bool) -> dict[str, tuple[dict, Path]]:
    """{"energy", "encoder", "generator"} -> (state dict, the file or folder it came from), from an
    export or a checkpoint in either layout (`bidvl.run_dir`); the generator's is the EMA's when
    `ema` (the EMA module is a copy of the generator: the same keys)."""
    folder = Path(folder)
    if kind == "checkpoint" and deepspeed_layout(folder):
        try:
            states = {net: (state, folder) for net, state in read_deepspeed_nets(folder).items()}
        except Exception as exc:  # torch.load's errors for damaged or foreign files
            raise EvalError(f"{folder}: DeepSpeed weights not readable ({type(exc).__name__}: {_first(exc)})") from None
    else:
        files = weight_files(folder, kind)
        states = {net: (read_weights(path), path) for net, path in files.items() if not (ema and net == "generator")}
    if ema:
        states["generator"] = (read_weights(folder / EMA_FILE), folder / EMA_FILE)
    return states


def _load_into(net: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise EvalError(f"{path} does not fit the net built from the run's config: {first}") from None


def use_ema(folder: Path, ema: bool | None) -> bool:
    """Whether to load `folder`'s generator EMA: None = if present, False = no, True = required."""
    present = (Path(folder) / EMA_FILE).is_file()
    if ema is True and not present:
        raise EvalError(f"ema=True (the generator EMA) but {Path(folder) / EMA_FILE} is missing: "
                        f"the run was trained without train.ema > 0")
    return present if ema is None else bool(ema)


def load_run(run_dir: str | os.PathLike, checkpoint: str | int | None = None,
             device: torch.device | str = "cpu", ema: bool | None = None) -> LoadedRun:
    """Config + nets (eval mode, requires_grad off) + step for a run folder or an export folder;
    the generator holds the EMA weights when the folder has them unless ema=False (see above)."""
    kind, folder, step = resolve_weights(run_dir, checkpoint)
    cfg = run_config(run_dir)
    try:
        nets = build_nets(cfg.model, channels=cfg.data.channels, resolution=cfg.data.resolution)
    except ValueError as exc:
        raise EvalError(f"{RunDir(run_dir).config}: {exc}") from None
    generator = "ema" if use_ema(folder, ema) else "trained"
    states = net_states(folder, kind, generator == "ema")
    for name, net in zip(("energy", "encoder", "generator"), nets):
        _load_into(net, *states[name])
        net.to(device).eval().requires_grad_(False)
    return LoadedRun(cfg, nets, step, folder, kind, generator)


def heldout_data(cfg: Config, split: str = "") -> tuple[str, str]:
    """(folder, split) of the run's test images: `data.test`, or `data.train` when that is empty."""
    return (cfg.data.test or cfg.data.train), (split or cfg.data.test_split)


def train_data(cfg: Config) -> tuple[str, str]:
    return cfg.data.train, cfg.data.train_split
