"""Checkpoints and the export: writing, verifying, finding and loading them, and the run lock.

Where each file goes is `bidvl.run_dir`'s (the one module that spells the run folder's names;
the layout is in its docstring); this module writes and checks what it names. The engine writes,
resumes and rolls back through it; `bidvl.evaluation.loading` reads weights through run_dir.

Saving writes into the temp folder, fsyncs every file, writes the marker, then renames the
folder in one step, so a checkpoint exists under its final name only when it is complete.

Loading verifies every file against the manifest (and the loaded parameters against
replicas.json); a damaged checkpoint is reported by name and, with checkpoint.on_damaged=fallback
(the default), the previous complete one is used instead; nothing damaged is trained on.
Checkpoints written before manifests existed load with a warning that they cannot be verified.

One training run per folder: `RunLock` holds an exclusive flock on RUN_DIR/.lock for the whole run
(main process; the flock itself is `bidvl.run_dir.FolderLock`, which `bidvl train` takes as soon
as the config is read, before the trainer's imports). The kernel releases it when the process ends, however it ends, so a dead holder
never blocks a new run. On a local file system the exclusion is guaranteed. Across nodes it holds
where the shared file system implements flock across clients: NFS (Linux clients emulate flock
with NFS byte-range locks; a crashed holder's lock is freed when its lease expires, ~90 s on
NFSv4), GPFS and BeeGFS, and Lustre mounted with `-o flock` (with `-o localflock` or no option it
does not exclude across nodes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import yaml
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from .config import ARCH_AUTO, Config, ConfigError, flatten, load_config, resolve, to_dict, to_yaml
from .io import file_sha256, write_failure, write_text
from .models import cpu_state_dict
from .run_dir import (CONFIG_FILE, EMA_FILE, MANIFEST, MARKER, REPLICAS_FILE, TRAIN_STATE_FILE, FolderLock, RunDir,
                      is_complete, step_of)


class CheckpointError(ConfigError):
    """A checkpoint or run folder that cannot be used (missing, incomplete, damaged, trained with
    another config, locked by another run, not writable); the message names the folder or file
    and, where it applies, the config key."""


class DamagedCheckpoint(CheckpointError):
    """A complete checkpoint whose files do not match what was written."""


@dataclass
class TrainState:
    """Counters saved as `train_state.json` in every checkpoint."""

    step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for non-finite gradients (and fp16 overflow)
    skipped_in_a_row: int = 0  # consecutive training steps with a skipped optimizer step
    rollbacks: int = 0
    budget_used_s: float = 0.0  # training time counted against train.time_budget_min
    lr_scale: float = 1.0  # lowered by each rollback after repeated non-finite steps
    world_size: int = 0  # processes that trained up to here (0: not recorded, older checkpoints)
    health: str = ""  # the verdict of the last health check at or before `step` ("": none yet)
    health_lines: int = 0  # lines of RUN_DIR/health.jsonl written up to here (bidvl.health)
    restarts: int = 0  # health restarts (health.on_unhealthy=restart) so far
    noise_seed: int = -1  # the noise seed set by the last restart (-1: run.seed's, no restart)
    ema_updates: int = 0  # generator EMA updates since the EMA started (train.ema_warmup's count)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    @classmethod
    def read(cls, path: Path) -> "TrainState":
        """From a checkpoint's train_state.json; missing keys keep their defaults. A value of the
        wrong type or out of its range (a step of -5 or 10**12, a NaN budget) is a ValueError
        naming the file and key: the checkpoint counts as damaged."""
        saved = json.loads(Path(path).read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: not a JSON object")
        state = cls()
        for f in dataclasses.fields(cls):
            if f.name not in saved:
                continue
            kind, value = type(getattr(state, f.name)), saved[f.name]
            value = _coerced(value, kind)
            if value is None:
                raise ValueError(f"{path}: {f.name}={saved[f.name]!r}, expected "
                                 f"{'a number' if kind is float else 'an integer' if kind is int else 'text'}")
            low, high = STATE_RANGES.get(f.name, (0, 2**31 - 1))
            if kind is not str and not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{path}: {f.name}={value!r}, expected a value in [{low}, {high}]")
            if f.name == "health" and value not in ("", "healthy", "warning", "unhealthy"):
                raise ValueError(f"{path}: health={value!r}, expected '', healthy, warning or unhealthy")
            setattr(state, f.name, kind(value))
        return state


def _coerced(value, kind):
    """`value` as `kind` (int, float or str) when it is one (an integral float or a decimal string
    for an int, as older versions may have written), else None."""
    if isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value, 10)
        except ValueError:
            return None
    if kind is int and isinstance(value, float):
        return int(value) if value.is_integer() else None
    return kind(value) if isinstance(value, (int, float)) else None


# TrainState fields whose range is not [0, 2**31): a budget in seconds (up to ~300 years), the LR
# scale rollbacks lower, the noise seed (-1: none set).
STATE_RANGES = {"budget_used_s": (0.0, 1e10), "lr_scale": (1e-30, 1.0), "noise_seed": (-1, 2**32 - 1)}


# Keys whose change on resume changes which images each later step sees (bidvl.data.reader).
# (data.train is left out: the same shards from another source keep their order.)
DATA_ORDER_KEYS = ("data.num_workers", "train.batch_size", "train.grad_accum", "data.shuffle_buffer")


def _digest(named_tensors) -> str:
    h = hashlib.sha256()
    for name, t in named_tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def replica_digest(nets: Iterable[torch.nn.Module]) -> str:
    """sha256 of every parameter of the nets: equal on all ranks, or DDP broke.

    Buffers are left out on purpose: with broadcast_buffers=False each rank keeps BatchNorm
    running statistics of its own batches (rank 0's are saved), unless model.sync_batchnorm.
    """
    return _digest(item for net in nets for item in net.named_parameters())


def buffer_digest(nets: Iterable[torch.nn.Module]) -> str:
    """sha256 of every buffer of the nets (BatchNorm running statistics, counters, spectral-norm
    vectors): those of the process that saves, which every rank loads back."""
    return _digest(item for net in nets for item in net.named_buffers())


# Keys a resumed run can never change (the weights would not fit), and keys whose change alters the
# maths the checkpoint was trained with (refused unless checkpoint.allow_changes=true). Every other
# change (budgets, logging, evaluation, learning rates, ...) is allowed and printed.
FIXED_KEYS = ("model.", "data.resolution", "data.channels")
MATHS_KEYS = ("objective.", "train.energy_optim.betas", "train.latent_optim.betas")


def config_changes(saved: Config, current: Config) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) of every key that differs."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(current))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_compatible(cfg: Config, folder: Path, typed: Config | None = None) -> list[tuple[str, object, object]]:
    """The config changes since `folder` was saved, a diff of the two configs resolved
    (bidvl.config.resolve; a saved config.yaml that predates a key ran its LEGACY value). A change
    of the nets or the data shape fails, and one of the maths (objective, optimizer betas) unless
    checkpoint.allow_changes=true; each error names the key and both values. `typed`: the config
    as the user gave it (default `cfg`), to say which value came from `auto`."""
    written = flatten(yaml.safe_load((folder / CONFIG_FILE).read_text()) or {})
    saved = resolve(load_config(folder / CONFIG_FILE), written=written, launcher=False)
    ours = resolve(cfg, launcher=False)
    typed = flatten(to_dict(typed or cfg))
    changes = [(key, theirs, f"{new} (auto for model.arch={cfg.model.arch})"
                if key in ARCH_AUTO and typed.get(key) == "auto" else new)
               for key, theirs, new in config_changes(saved, ours)]
    for key, theirs, ours in sorted(changes, key=lambda change: not change[0].startswith(FIXED_KEYS)):
        fixed = key.startswith(FIXED_KEYS)
        if fixed or (key.startswith(MATHS_KEYS) and not cfg.checkpoint.allow_changes):
            raise CheckpointError(
                f"checkpoint {folder} was trained with {key}={theirs!r}, this config has {key}={ours!r}"
                + ("" if fixed else ": a change to the maths of a resumed run (set "
                   "checkpoint.allow_changes=true to resume with it anyway)"))
    return changes


def _write_manifest(folder: Path) -> None:
    """Size and sha256 of every file (DeepSpeed writes one sub-folder per engine), each fsynced;
    then the manifest itself, fsynced."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size,
                                                          "sha256": file_sha256(path)}
    with open(folder / MANIFEST, "w") as f:
        f.write(json.dumps({"files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


MARKER_MANIFEST = "manifest sha256 "  # the marker's second line: the manifest's own digest


def _write_marker(folder: Path, step: int) -> None:
    """The COMPLETE marker, written last: the step, then the manifest's sha256, so that a manifest
    deleted or rewritten afterwards is damage, not a checkpoint "from before manifests"."""
    with open(folder / MARKER, "w") as f:
        f.write(f"{step}\n{MARKER_MANIFEST}{file_sha256(folder / MANIFEST)}\n")
        f.flush()
        os.fsync(f.fileno())


RNG_SENTINEL = 0x5EEDDEAD


def _rng_sentinel(before=None):
    """Accelerate's load_state skips a random-state file it cannot load with an INFO log line,
    leaving the global RNGs as they were. Called before the load: seeds torch's CPU and CUDA RNGs
    with RNG_SENTINEL and returns their states; called after it with those states: True when they
    are unchanged (the file was not loaded; a saved state equal to the sentinel's is not credible).
    A failure is per rank (the file is): the ranks may then decide differently."""
    if before is None:
        torch.manual_seed(RNG_SENTINEL)  # CPU and every CUDA device
        return (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])
    cpu, cuda = before
    same_cuda = not cuda or all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all()))
    return torch.equal(cpu, torch.get_rng_state()) or (bool(cuda) and same_cuda)


def verify(folder: Path) -> bool:
    """Checks every file of a complete checkpoint against its manifest, and the manifest against
    the digest its marker records; raises DamagedCheckpoint naming the first bad file. False: a
    checkpoint written before manifests (its marker records none: not verifiable)."""
    folder = Path(folder)
    try:
        lines = (folder / MARKER).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedCheckpoint(f"checkpoint {folder}: unreadable {MARKER} marker ({exc})") from None
    recorded = next((x[len(MARKER_MANIFEST):] for x in lines if x.startswith(MARKER_MANIFEST)), None)
    if recorded is not None:
        if not (folder / MANIFEST).is_file():
            raise DamagedCheckpoint(f"checkpoint {folder}: {MANIFEST} is missing (its {MARKER} marker "
                                    f"records one)")
        if file_sha256(folder / MANIFEST) != recorded:
            raise DamagedCheckpoint(f"checkpoint {folder}: {MANIFEST} does not match the sha256 its "
                                    f"{MARKER} marker records (edited or corrupted)")
    if not (folder / MANIFEST).is_file():
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        expected = {name: (int(f["size"]), str(f["sha256"])) for name, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DamagedCheckpoint(f"checkpoint {folder}: unreadable {MANIFEST} ({exc})") from None
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"checkpoint {folder}: {name} is missing")
        if path.stat().st_size != size:
            raise DamagedCheckpoint(f"checkpoint {folder}: {name} has {path.stat().st_size} bytes, "
                                    f"{size} were written (truncated or replaced)")
        if file_sha256(path) != digest:
            raise DamagedCheckpoint(f"checkpoint {folder}: {name} does not match the sha256 written "
                                    f"with it (corrupted)")
    return True


def _write_error(exc: Exception, tmp: Path, run_dir: Path, what: str = "") -> str:
    """One line for a failed write (bidvl.io.write_failure names it). `what`: the thing written
    (default: the checkpoint named by `tmp`)."""
    what = what or f"checkpoint {tmp.name.removeprefix('.tmp_')}"
    return (f"cannot write {what}: {write_failure(exc, tmp)}; its temp folder was removed; "
            f"the complete checkpoints in {RunDir(run_dir).checkpoints} are untouched")


def _remove(folder: Path) -> None:
    """Deletes a complete checkpoint: the marker first, so a half-deleted folder is never complete."""
    (folder / MARKER).unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class RunLock:
    """The run folder's `FolderLock` (bidvl.run_dir), agreed on by every rank: the main process
    takes it, or adopts `held`, the one `bidvl train` took before its imports; the other ranks take
    its answer. See the module docstring for what it guarantees across nodes."""

    def __init__(self, accelerator, run_dir: Path, held: FolderLock | None = None):
        self.accelerator = accelerator
        self.folder_lock = held if held is not None else FolderLock(run_dir)
        if self.folder_lock.path != RunDir(run_dir).lock:
            raise ValueError(f"the lock held is {self.folder_lock.path}, not {RunDir(run_dir).lock}")
        self.path = self.folder_lock.path

    def acquire(self) -> None:
        refusal = ""
        if self.accelerator.is_main_process:
            refusal = self.folder_lock.take()  # "" at once when adopted
        else:  # taken early on an environment's word that this was rank 0 (never on our launchers)
            self.folder_lock.release()
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise CheckpointError(refusal)

    def release(self) -> None:
        self.folder_lock.release()


class Checkpointer:
    """Saves, finds and loads a run's checkpoints and writes its export; every rank calls each
    method (they synchronise), the main process alone writes our files.

    `nets` is {"energy": ..., "encoder": ..., "generator": ...} of *unwrapped* modules; Accelerate's
    save_state/load_state handle the prepared ones (weights, optimizers, RNG states per process).
    """

    def __init__(self, accelerator, cfg: Config, typed: Config | None = None, lock: FolderLock | None = None):
        self.accelerator = accelerator
        self.cfg = cfg  # resolved (bidvl.config.resolve); `typed`: as the user gave it, for messages
        self.typed = typed or cfg
        self.run = RunDir(cfg.run.dir)
        self.run_dir = self.run.path
        self.folder = self.run.checkpoints
        self.lock = RunLock(accelerator, self.run_dir, held=lock)  # `lock`: taken early by `bidvl train`

    def end(self) -> None:
        self.lock.release()

    def begin(self) -> None:
        """At the start of training: the run folder locked for this run (every rank fails if
        another run holds it), temp folders of a killed run removed (after locking: never another
        live run's). A run folder whose layout is broken (run.dir or one of its folders a file) is
        refused here, naming the path, not after training when the first checkpoint is written."""
        problem = self.run.layout_problem()
        if problem:
            raise CheckpointError(problem)
        self.lock.acquire()
        if self.accelerator.is_main_process:
            for partial_folder in self.run.temp_checkpoints():
                shutil.rmtree(partial_folder, ignore_errors=True)

    def write_config(self) -> None:
        """RUN_DIR/config.yaml, the resolved config (main process; after a resume was accepted)."""
        if self.accelerator.is_main_process:
            write_text(self.run.config, to_yaml(self.cfg))

    def save(self, state: TrainState, nets: dict, ema=None) -> Path:
        """Accelerate state + our JSON/safetensors into a temp folder, fsync, the marker, one
        rename. Keeps the newest `checkpoint.keep` complete ones (never fewer than one)."""
        acc = self.accelerator
        final, tmp = self.run.checkpoint(state.step), self.run.temp_checkpoint(state.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
        except Exception as exc:  # a full disk raises OSError, RuntimeError or SafetensorError
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(_write_error(exc, tmp, self.run_dir)) from None

        digests = gather_object([replica_digest(nets.values())])
        acc.wait_for_everyone()
        if acc.is_main_process:
            if len(set(digests)) != 1:
                bad = [r for r, d in enumerate(digests) if d != digests[0]]
                raise RuntimeError(f"replicas diverged at step {state.step}: ranks {bad} differ from rank 0")
            try:
                (tmp / REPLICAS_FILE).write_text(json.dumps({"sha256": digests,
                                                               "buffers_sha256": buffer_digest(nets.values())}) + "\n")
                state.world_size = acc.num_processes
                (tmp / TRAIN_STATE_FILE).write_text(state.to_json())
                (tmp / CONFIG_FILE).write_text(to_yaml(self.cfg))
                if ema is not None:
                    save_file(ema.state_dict(), str(tmp / EMA_FILE))
                _write_manifest(tmp)
                _write_marker(tmp, state.step)
            except Exception as exc:  # see above
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(_write_error(exc, tmp, self.run_dir)) from None
            _replace(tmp, final)
            kept = set(self.run.complete_checkpoints()[-self.cfg.checkpoint.keep:])
            if self.cfg.health.on_unhealthy == "restart":  # what a restart would go back to
                kept.update(self._healthy()[:1])
            for old in self.run.complete_checkpoints():
                if old not in kept:
                    _remove(old)
        acc.wait_for_everyone()
        return final

    def _healthy(self) -> list[Path]:
        """Complete checkpoints whose last health check was healthy, newest first."""
        return [folder for folder in self.run.complete_checkpoints()[::-1]
                if TrainState.read(folder / TRAIN_STATE_FILE).health == "healthy"]

    def restart_point(self, nets: dict, ema=None) -> tuple[Path, TrainState] | None:
        """Loads the newest complete checkpoint whose health check was healthy (for
        health.on_unhealthy=restart); None when there is none."""
        return self._load_newest_good(self._healthy(), nets, ema, self.cfg.checkpoint.on_damaged == "fallback")

    def discard_after(self, step: int) -> None:
        """Removes the complete checkpoints past `step` (a restart abandons them: a later resume
        must continue the restarted run, not the abandoned one). Main process; all ranks wait."""
        if self.accelerator.is_main_process:
            for folder in self.run.complete_checkpoints():
                if step_of(folder) > step:
                    _remove(folder)
        self.accelerator.wait_for_everyone()

    def find_resume(self) -> list[Path]:
        """The checkpoints `checkpoint.resume` allows, to try in order: auto (every complete one,
        newest first), none (no checkpoint), or the one complete checkpoint folder it names."""
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return []
        if resume == "auto":
            return self.run.complete_checkpoints()[::-1]
        path = Path(resume)
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete checkpoint folder (no {MARKER} marker)"
            )
        return [path]

    def load(self, folder: Path, nets: dict, ema=None) -> TrainState:
        """Verifies `folder`, restores the prepared nets, optimizers and RNG states (Accelerate) and
        the EMA, checks the loaded parameters against replicas.json; returns the saved TrainState.
        Raises DamagedCheckpoint naming what is wrong (the nets may then hold part of it: load
        another checkpoint before training)."""
        verified = verify(folder)
        changes = check_compatible(self.cfg, folder, self.typed)
        if not verified and self.accelerator.is_main_process:
            print(f"warning: checkpoint {folder} has no {MANIFEST} (written by an older version): "
                  "its files cannot be verified", file=sys.stderr, flush=True)
        sentinel = _rng_sentinel()
        try:
            self.accelerator.load_state(str(folder))  # safetensors + weights_only torch.load
            state = TrainState.read(folder / TRAIN_STATE_FILE)
            ema_starts = ema is not None and any(key == "train.ema" and not old for key, old, _ in changes)
            if ema_starts:  # saved without an EMA: it starts here, from the loaded generator
                ema.start_from(nets["generator"])
                state.ema_updates = 0
            elif ema is not None:
                ema.load_state_dict(load_file(str(folder / EMA_FILE)))
            replicas = json.loads((folder / REPLICAS_FILE).read_text())
            saved, saved_buffers = replicas["sha256"][0], replicas.get("buffers_sha256")
        except Exception as exc:  # whatever a damaged file makes Accelerate, torch or JSON raise
            raise DamagedCheckpoint(f"checkpoint {folder}: cannot be loaded ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        name = f"random_states_{self.accelerator.process_index}.pkl"  # absent: saved by fewer processes
        if (folder / name).is_file() and _rng_sentinel(sentinel):
            raise DamagedCheckpoint(f"checkpoint {folder}: {name} could not be loaded (Accelerate skips a "
                                    f"random-state file it cannot read): the resume would not be exact")
        if replica_digest(nets.values()) != saved:
            raise DamagedCheckpoint(f"checkpoint {folder}: the loaded parameters do not match the "
                                    f"digest in replicas.json")
        if saved_buffers is not None and buffer_digest(nets.values()) != saved_buffers:  # (older: none)
            raise DamagedCheckpoint(f"checkpoint {folder}: the loaded buffers (BatchNorm statistics) do not "
                                    f"match the digest in replicas.json")
        if self.accelerator.is_main_process:
            self._report_changes(folder, changes, state.world_size)
            if ema_starts:
                print(f"{folder} was saved without an EMA (train.ema=0): the generator's EMA starts "
                      f"from its weights at step {state.step}", file=sys.stderr, flush=True)
        return state

    def _report_changes(self, folder: Path, changes: list, world_size: int) -> None:
        if changes:
            lines = "".join(f"\n  {k}: {old!r} -> {new!r}" for k, old, new in changes)
            print(f"resuming {folder} with a changed config:{lines}", file=sys.stderr, flush=True)
        now = self.accelerator.num_processes
        if world_size and world_size != now:
            print(f"warning: {folder} was trained on {world_size} processes, this run has {now}: the "
                  f"global batch becomes {now} x train.batch_size, the data order changes (each rank's "
                  f"stream is a function of rank and world size), and so does the epoch length and with "
                  f"it where the per-epoch LR decay steps fall", file=sys.stderr, flush=True)
        order = [k for k, _, _ in changes if k in DATA_ORDER_KEYS]
        if order:
            print(f"warning: {', '.join(order)} changed: the data order from here differs from the "
                  f"uninterrupted run's (the stream is a function of seed, rank, worker roles and batch "
                  f"size; see bidvl/data/reader.py), and the epoch length may change", file=sys.stderr, flush=True)

    def resume(self, nets: dict, ema=None) -> tuple[Path, TrainState] | None:
        """Loads what `checkpoint.resume` asks for (see `find_resume`); None: start from scratch."""
        fallback = self.cfg.checkpoint.resume == "auto" and self.cfg.checkpoint.on_damaged == "fallback"
        return self._load_newest_good(self.find_resume(), nets, ema, fallback)

    def rollback(self, nets: dict, ema=None) -> tuple[Path, TrainState] | None:
        """Loads the newest complete checkpoint (for train.on_nonfinite=rollback)."""
        return self._load_newest_good(self.run.complete_checkpoints()[::-1], nets, ema,
                                      self.cfg.checkpoint.on_damaged == "fallback")

    def _load_newest_good(self, candidates: list[Path], nets: dict, ema, fallback: bool):
        """The first of `candidates` that loads undamaged. A damaged one is reported by name; with
        `fallback` the next one is tried, else it is a DamagedCheckpoint error. Every rank
        verifies the same files and so decides alike."""
        damaged = []
        for folder in candidates:
            try:
                return folder, self.load(folder, nets, ema)
            except DamagedCheckpoint as exc:
                if not fallback:
                    raise
                damaged.append(str(exc))
                if self.accelerator.is_main_process:
                    print(f"warning: {exc}; falling back to the previous complete checkpoint "
                          "(checkpoint.on_damaged=fallback)", file=sys.stderr, flush=True)
        if damaged:
            raise DamagedCheckpoint(f"every complete checkpoint in {self.folder} is damaged (newest: "
                                    f"{damaged[0]}); move them away to train from scratch")
        return None

    def export(self, step: int, nets: dict, ema=None, extra=None) -> Path:
        """The nets as RUN_DIR/model/{energy,encoder,generator}.safetensors (step in each file's
        metadata) + the resolved config, written atomically by the main process; `extra(folder)`
        adds files (the model card) before the folder is renamed into place."""
        acc = self.accelerator
        out, tmp = self.run.export, self.run.temp_export
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                for name, net in nets.items():  # energy, encoder, generator: EXPORT_FILES
                    save_file(cpu_state_dict(net), str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
                if ema is not None:
                    save_file(ema.state_dict(), str(tmp / EMA_FILE))
                (tmp / CONFIG_FILE).write_text(to_yaml(self.cfg))
                if extra is not None:
                    extra(tmp)
            except Exception as exc:  # a full disk: named, the temp folder removed, the old export kept
                shutil.rmtree(tmp, ignore_errors=True)
                raise CheckpointError(_write_error(exc, tmp, self.run_dir, f"the model export {out}")) from None
            _replace(tmp, out)
        acc.wait_for_everyone()
        return out
