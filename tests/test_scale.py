"""Scaling out on one machine: two "nodes" through launch/slurm/node_launch.sh, the sbatch script
with stand-ins for srun/scontrol (SIGUSR1 -> checkpoint -> requeue), and the benchmark.

Each "node" is one `accelerate launch` with one CPU process (ACCELERATE_USE_CPU=1); two of them
meet through the same c10d rendezvous that real nodes use.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import BIN, REPO, TINY, weights

NODE_LAUNCH = REPO / "launch/slurm/node_launch.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra) -> dict:
    """Environment of a CPU "cluster": the venv's accelerate first on PATH, one thread per process."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


def replicas(checkpoint: Path) -> list[str]:
    return json.loads((checkpoint / "replicas.json").read_text())["sha256"]


def kill_tree(*procs: subprocess.Popen) -> None:
    """After a failed check: no training process may outlive the test."""
    for proc in procs:
        if proc.poll() is not None:  # exited and reaped: its pid may belong to someone else now
            continue
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def complete(run: Path) -> list[Path]:
    found = [p.parent for p in (run / "checkpoints").glob("step_*/COMPLETE")]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


@pytest.mark.slow
def test_two_nodes_train_with_identical_replicas(tmp_path, digits16):
    """node_launch.sh as train.sbatch runs it on each node: NNODES=2, one process per node."""
    run = tmp_path / "run"
    env = cpu_env(NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = ["launch/train.py", "--config", "configs/digits.yaml", *TINY, f"run.dir={run}",
            f"data.train={digits16}", "train.max_steps=4", "checkpoint.every=2"]
    nodes = [subprocess.Popen([str(NODE_LAUNCH), *args], cwd=REPO, env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        kill_tree(*nodes)
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    assert [p.name for p in complete(run)] == ["step_00000002", "step_00000004"]
    for checkpoint in complete(run):
        digests = replicas(checkpoint)
        assert len(digests) == 2 and digests[0] == digests[1]
    assert (run / "model" / "generator.safetensors").is_file()


FAKE_SRUN = '''#!{python}
"""Stand-in for srun in a one-machine test: runs the command once per "node" (SLURM_NNODES) with
SLURM_NODEID set, each task in its own process group; forwards SIGUSR1/SIGTERM to the tasks' process
groups, as slurmstepd does with proctrack/pgid; exits with the highest task status."""
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i)}}, start_new_session=True)
         for i in range(int(os.environ["SLURM_NNODES"]))]
def forward(signum, frame):
    for t in tasks:
        try:
            os.killpg(t.pid, signum)
        except ProcessLookupError:
            pass
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(t.wait() for t in tasks))
'''

FAKE_SCONTROL = '''#!/bin/bash
# Stand-in for scontrol: `show hostnames` gives the loopback "head node"; `requeue` is recorded.
case "$1 $2" in
  "show hostnames") echo 127.0.0.1; echo 127.0.0.1 ;;
  requeue*) echo "$@" >> "$FAKE_SLURM_LOG" ;;
esac
'''


def fake_slurm(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def sbatch(fake_bin, run, shards, extra, log):
    """train.sbatch as Slurm would run it on 2 nodes x 1 "GPU" (CPU processes here)."""
    env = cpu_env(
        PATH=os.pathsep.join([str(fake_bin), str(BIN), os.environ["PATH"]]),
        SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[01-02]", SLURM_SUBMIT_DIR=str(REPO),
        GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), FAKE_SLURM_LOG=str(log),
        CONFIG="configs/digits.yaml", RUN_DIR=str(run),
        EXTRA=" ".join([*TINY, f"data.train={shards}", "checkpoint.every=2", *extra]),
    )
    return subprocess.Popen(["bash", str(REPO / "launch/slurm/train.sbatch")], cwd=run.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sbatch_usr1_checkpoints_and_requeues(tmp_path, digits16):
    """The time-limit path: SIGUSR1 to the batch script -> srun -> node_launch.sh -> training
    processes checkpoint and exit 0 -> `scontrol requeue`. The requeued job runs the same command
    with checkpoint.resume=auto (resuming itself is tested in tests/test_train.py)."""
    run, log, fake_bin = tmp_path / "run", tmp_path / "slurm.log", fake_slurm(tmp_path / "bin")
    job = sbatch(fake_bin, run, digits16, ["train.max_steps=100000"], log)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not complete(run) and job.poll() is None:
            time.sleep(0.5)
        if not complete(run):
            kill_tree(job)
            pytest.fail("no checkpoint written:\n" + job.communicate(timeout=30)[0][-3000:])
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does near the time limit
        out = job.communicate(timeout=180)[0]
    finally:
        kill_tree(job)
    assert job.returncode == 0, out[-3000:]
    assert log.read_text().split() == ["requeue", "4242"], out[-3000:]
    assert not (run / "model").exists(), out[-3000:]  # stopped early, not finished
    last = complete(run)[-1]
    digests = replicas(last)
    assert len(digests) == 2 and digests[0] == digests[1]
    resolved = (run / "config.yaml").read_text()
    assert "resume: auto" in resolved and f"dir: {run}" in resolved


@pytest.mark.process
def test_benchmark_prints_one_json_object():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/benchmark.py"), "--config", "configs/digits.yaml",
         "--steps", "2", "--warmup", "1", "--batch-size", "8", "--device", "cpu",
         "--variants", "fp32,bf16+cudnn_benchmark", "--profile", "1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for key in ("config", "device", "batch_size", "steps", "warmup", "variants", "data", "flops_per_iter",
                "peak_tflops", "memory"):
        assert key in result, key
    assert set(result["variants"]) == {"fp32", "bf16+cudnn_benchmark"}
    assert result["variants"]["bf16+cudnn_benchmark"]["cudnn_benchmark"] is True
    for variant in result["variants"].values():
        for key in ("engine", "plain", "ratio_engine_to_plain", "mfu"):
            assert key in variant, key
        for side in ("engine", "plain"):
            for key in ("step_ms", "images_per_s", "peak_memory_mb", "pipelined_step_ms"):
                assert variant[side][key] > 0, (side, key)
            assert variant[side]["device_reads_per_iter"] == 0, side  # (issue 28; both sides' fused Adam)
            ops = variant[side]["profile"]  # --profile 1: the top operators of one step
            assert ops and all(op["self_ms_per_step"] >= 0 and op["calls_per_step"] > 0 for op in ops)
            assert any("conv" in op["op"] for op in ops), [op["op"] for op in ops]


def test_benchmark_times_the_loader_on_stand_in_shards(monkeypatch):
    """--stand-in-data: configs/celeba128.yaml's shards are not here; photo crops written at its
    resolution and channels stand in, read with its loader settings (workers off here)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from benchmark import stand_in_data_wait

    from bidvl.config import load_config

    cfg = load_config(REPO / "configs/celeba128.yaml", ["data.num_workers=0"])
    data = stand_in_data_wait(cfg, batch_size=8, batches=3, images=24)
    assert data["shards"].startswith("stand-in: 24 crops") and data["num_workers"] == 0
    assert data["batches"] == 3 and data["ms_per_batch"] > 0 and data["first_batch_ms"] > 0


def test_benchmark_interpolate_token_restores_the_old_upsampling(monkeypatch):
    """Variant token `interpolate`: the measuring process's ResNet generator upsamples with
    F.interpolate (the whole-step A/B of resnet.upsample2x on a GPU)."""
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # measure() sets it in this process
    from benchmark import measure, parse_variant

    from bidvl.models import resnet

    monkeypatch.setattr(resnet, "upsample2x", resnet.upsample2x)  # measure() patches this process
    assert parse_variant("bf16+interpolate") == {"precision": "bf16", "channels_last": False, "compile": False,
                                                 "cudnn_benchmark": False, "interpolate": True}
    original = resnet.upsample2x
    result = measure("plain", str(REPO / "configs/cifar10_resnet.yaml"), parse_variant("fp32+interpolate"),
                     "cpu", batch_size=2, steps=1, warmup=0)
    assert result["step_ms"] > 0 and resnet.upsample2x is not original
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(resnet.upsample2x(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


@pytest.mark.process
def test_upsample_benchmark_prints_one_json_object():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/benchmark_upsample.py"), "--config", "configs/cifar10_resnet.yaml",
         "--device", "cpu", "--batch-size", "2", "--repeats", "1", "--dtypes", "fp32,bf16"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    # cifar10_resnet: generator width 256, 4x4 -> 32 px in three up-blocks
    assert [b["shape"] for b in result["blocks"][:3]] == [[2, 256, 4, 4], [2, 256, 8, 8], [2, 256, 16, 16]]
    methods = ("interpolate", "slices", "interpolate_cl", "via_cl")
    assert set(result["forward_backward_ms_per_generator_pass"]) == {f"{d}/{m}" for d in ("fp32", "bf16") for m in methods}
    for block in result["blocks"]:
        for method in methods:
            assert 0 < block[method]["forward_ms"] and 0 < block[method]["forward_backward_ms"]
    refused = subprocess.run([sys.executable, str(REPO / "tools/benchmark_upsample.py"), "--config",
                              "configs/cifar10.yaml"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "model.arch='dcgan'" in refused.stderr


# ---------------------------------------------------------------- joint batch (tests/joint_batch_worker.py)


def joint_batch(tmp_path, name: str, processes: int, *args, fails: bool = False) -> dict | str:
    """Weights after the worker's 3 steps on a global batch of 16, split over `processes` (with
    fails=True: the stderr of a run that must fail)."""
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*(head if processes > 1 else [sys.executable]), str(REPO / "tests/joint_batch_worker.py"),
           "--run-dir", str(tmp_path / name), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    if fails:
        assert proc.returncode != 0
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    return weights(tmp_path / name)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_joint_batch(tmp_path):
    """DDP's averaged gradients of two half batches are the joint batch's gradients: the same weights
    after 3 bi-level steps. Nets in eval mode, so that per-rank BatchNorm statistics do not enter
    (torch's SyncBatchNorm refuses CPU tensors; the synced train-mode check is the GPU test below)."""
    one = joint_batch(tmp_path, "one", 1, "--eval-mode")
    two = joint_batch(tmp_path, "two", 2, "--eval-mode")
    assert max_difference(one, two) < 1e-6
    if not torch.cuda.is_available():  # the engine names the option rather than failing in DDP
        err = joint_batch(tmp_path, "synced", 2, "--eval-mode", "model.sync_batchnorm=true", fails=True)
        assert "model.sync_batchnorm=true needs GPUs" in err, err[-2000:]


@pytest.mark.slow
def test_divergence_triangle_on_two_processes_equals_one_process(tmp_path):
    """The triangle's three per-net updates (energy net, then encoder, then generator, each its own
    backward, all-reduce, clip at 100 and step) under DDP: two half batches end where the joint
    batch does, after 3 steps. Han et al.'s nets and settings (configs/cifar10_triangle.yaml)."""
    triangle = ["--eval-mode", "objective.name=divergence_triangle", "model.arch=triangle", "model.init=triangle",
                "model.spectral_norm=false", "model.energy_output=identity", "objective.w_latent=0.1",
                "train.grad_clip=100", "train.latent_optim.weight_decay=5e-4", "train.encoder_weight_decay=0"]
    one = joint_batch(tmp_path, "one", 1, *triangle)
    two = joint_batch(tmp_path, "two", 2, *triangle)
    assert max_difference(one, two) < 1e-6
    untrained = joint_batch(tmp_path, "untrained", 1, *triangle[:1], "--steps", "0", *triangle[1:])
    assert max_difference(one, untrained) > 1e-4  # the steps moved the weights


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="SyncBatchNorm needs a GPU")
def test_sync_batchnorm_two_processes_equal_one_process_on_the_joint_batch(tmp_path):
    """Nets in train mode: with model.sync_batchnorm=true, two processes (sharing one GPU over gloo)
    end with the weights and BatchNorm statistics of one process on the joint batch; without it
    they do not (per-rank batch statistics). TF32 is off in the worker, so fp32 is fp32."""
    one = joint_batch(tmp_path, "one", 1)
    synced = joint_batch(tmp_path, "synced", 2, "--share-gpu", "model.sync_batchnorm=true")
    unsynced = joint_batch(tmp_path, "unsynced", 2, "--share-gpu")
    d_synced, d_unsynced = max_difference(one, synced), max_difference(one, unsynced)
    print(f"max |difference| to one process: synced {d_synced:.3g}, not synced {d_unsynced:.3g}")
    assert d_synced < 1e-5 and d_unsynced > 100 * d_synced
