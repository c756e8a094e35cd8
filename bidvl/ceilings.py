"""Sizes against what the machine can hold, checked before anything big is allocated: a named
ConfigError instead of an allocation traceback (a 640 GB request) or a run that never makes a step.

    available_memory()                                  # bytes a new host allocation can get
    nets = build_nets_within_memory(cfg, device)        # the nets, and their training state checked
    loader_workers_problem(workers, option)             # "" or why too many loader workers

`launch/sample.py --num` checks its images against `available_memory` (bidvl.cli.sample).
"""

from __future__ import annotations

import os

import torch

from .config import Config, ConfigError
from .models import build_nets

# Bytes per parameter a DDP run holds whatever the batch: fp32 weights, their gradients and Adam's
# two moments (autocast keeps fp32 weights). Activations come on top and are not estimated: the
# check is a floor, which a config over it cannot possibly meet.
TRAINING_BYTES_PER_PARAMETER = 16
# Loader workers are processes decoding images. Above one per core they only add memory and start-up
# time (torch's DataLoader warns); above this many per core a run spends its time forking and
# switching (10000 workers never make a step), so it is refused.
WORKERS_PER_CORE = 4


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a SLURM allocation or taskset), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loader_workers_problem(workers: int, option: str, joiner: str = "=") -> str:
    """Why `workers` loader workers per process are too many for this machine ("" when they are
    not): more than WORKERS_PER_CORE per usable core. The ranks of one node each start their own,
    so on a node shared by several processes the sensible number is lower still."""
    cores = usable_cores()
    if workers <= WORKERS_PER_CORE * cores:
        return ""
    return (f"{option}{joiner}{workers} loader workers per process, but this process may run on {cores} "
            f"core(s): at most {WORKERS_PER_CORE * cores} ({WORKERS_PER_CORE} a core) are accepted; "
            f"lower {option} (about one a core is usually best)")


def build_nets_within_memory(cfg: Config, device: torch.device, deepspeed: bool = False):
    """bidvl.models.build_nets for `cfg`, then its training state against the memory of `device`:
    ConfigError naming the widths when the weights cannot even be allocated (a host allocation
    larger than the machine fails at once), or when weights, gradients and Adam's moments (16 bytes
    a parameter; under DeepSpeed, which partitions gradients and moments, the weights alone: 4)
    exceed a GPU's total memory or, on the CPU, the host's available memory. Before any optimizer
    state or activation exists; activations come on top, so passing is no promise."""
    try:
        nets = build_nets(cfg.model, channels=cfg.data.channels, resolution=cfg.data.resolution)
    except RuntimeError as exc:  # torch.OutOfMemoryError too; the CPU allocator's "can't allocate memory"
        if "allocate" not in str(exc):
            raise
        raise ConfigError(f"the nets cannot be allocated ({str(exc).splitlines()[0][:200]}): "
                          f"{_lower(cfg)}") from None
    counts = {name: sum(p.numel() for p in net.parameters())
              for name, net in zip(("energy", "encoder", "generator"), nets)}
    per_parameter = 4 if deepspeed else TRAINING_BYTES_PER_PARAMETER
    need = sum(counts.values()) * per_parameter
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device} has"
    else:
        have, where = available_memory(), "the host has"
    if need > have:
        sizes = ", ".join(f"{name} {count / 1e6:,.1f} M" for name, count in counts.items())
        raise ConfigError(
            f"the nets need at least {need / 2**30:,.1f} GiB before any activation ({sizes} parameters "
            f"x {per_parameter} bytes: weights, gradients, Adam's moments), {where} {have / 2**30:,.1f} GiB: "
            f"{_lower(cfg)}")
    return nets


def _lower(cfg: Config) -> str:
    m = cfg.model
    return (f"lower model.energy_width={m.energy_width}, model.encoder_width={m.encoder_width}, "
            f"model.generator_width={m.generator_width} or model.latent_dim={m.latent_dim}")
