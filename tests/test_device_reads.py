"""A training step reads nothing back from the device (issue 28): no `.item()`, `.tolist()`,
`bool()`, ... on a tensor between sync steps (log, images, evaluation, health, checkpoint, the last
step), on 1 and 2 processes. On a GPU each such read waits for every queued kernel and stops CUDA
graphs from capturing the step; on the CPU the same calls are counted (bidvl.benchmarking.DeviceReads).
"""

import json
import os
import subprocess

import pytest

from conftest import BIN, REPO, TINY
from read_count_worker import count_reads

STEPS = 11
# Sync steps at 4 and 8 (log, images, health), and the last (11); checkpoints only at the end.
SYNC = ["log.every=4", "log.images_every=4", "health.every=4", "checkpoint.every=1000", "eval.every=0",
        f"train.max_steps={STEPS}", "log.progress=lines"]
SYNC_STEPS = {4, 8}


def between_sync_steps(per_iteration):
    """The reads of the iterations that are not sync steps (iteration i makes step i)."""
    return {i: n for i, n in enumerate(per_iteration, start=1) if i not in SYNC_STEPS}


@pytest.mark.parametrize("overrides", [[], ["train.grad_clip=1.0", "train.ema=0.9"],
                                       ["objective.name=divergence_triangle"], ["objective.latent_term=not_offset"],
                                       ["train.compile=true", "train.compile_backend=aot_eager"]],
                         ids=["default", "clip+ema", "triangle", "not_offset", "compiled"])
def test_no_device_reads_between_sync_steps(tmp_path, digits16, overrides):
    from bidvl.config import load_config
    from bidvl.engine import Trainer

    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, *SYNC, f"run.dir={tmp_path / 'run'}",
                                                     f"data.train={digits16}", *overrides])
    trainer = Trainer(cfg)
    try:
        per_iteration, sites = count_reads(trainer)
    finally:
        trainer.close()
    assert len(per_iteration) == STEPS - 1
    if "train.compile=true" in overrides:
        # The first step compiles: dynamo, turning the nets' 0-d tensors into fake tensors, reads
        # their values once (18 reads here). The compiled steps after it read nothing.
        assert per_iteration[0] > 0
        per_iteration = [0, *per_iteration[1:]]
    assert between_sync_steps(per_iteration) == {i: 0 for i in between_sync_steps(per_iteration)}, sites
    # The sync steps do read (the logs, the health check, the non-finite counts): the counter sees them.
    assert all(per_iteration[i - 1] > 0 for i in SYNC_STEPS), per_iteration


@pytest.mark.process
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_no_device_reads_between_sync_steps_on_two_processes_with_a_loader_worker(tmp_path, digits16, precision):
    """As users run it: `accelerate launch` with two ranks (DDP, gloo on the CPU), a DataLoader
    worker, autocast and clipping (fp16: the shared GradScaler hands the fused Adam its found_inf);
    the per-step flags are agreed on the host (bidvl.distributed.HostFlags)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           str(REPO / "tests/read_count_worker.py"), "--out", str(tmp_path),
           *TINY, *SYNC, "data.num_workers=1", f"train.mixed_precision={precision}", "train.grad_clip=1.0", f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        counted = json.loads((tmp_path / f"reads_rank{rank}.json").read_text())
        per_iteration = counted["per_iteration"]
        assert len(per_iteration) == STEPS - 1
        assert set(between_sync_steps(per_iteration).values()) == {0}, counted["sites"]
        assert all(per_iteration[i - 1] > 0 for i in SYNC_STEPS), per_iteration
