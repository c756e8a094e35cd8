"""Shared by the test files: the tiny-run overrides, the 16 px digits shards (built once), and
the two tiers (docs/testing.md).

Tiers: a test that starts a process (a subprocess, `accelerate launch`, DataLoader workers), itself
or through a fixture, is in the `process` tier: marked `@pytest.mark.process`, or `slow`, or using
one of PROCESS_FIXTURES (marked here). `make test-fast` runs the rest (`-m "not process"`), and
there any process start fails the test naming the marker it lacks, so the tier cannot drift.
`make test` (CI) runs both.
"""

import multiprocessing.process
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bidvl.data import build_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's accelerate, next to its python
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Tiny nets on 16 px digits: a training step takes a few hundredths of a second on the CPU.
TINY = [
    "data.resolution=16", "model.latent_dim=8", "model.energy_width=8", "model.encoder_width=8",
    "model.generator_width=8", "train.batch_size=16", "data.num_workers=0", "log.every=2",
    "log.images_every=2", "log.num_images=4", "data.auto_build=''",
]


NETS = ("energy", "encoder", "generator")
# Fixtures that train a run in a subprocess: a test that uses one is in the process tier.
PROCESS_FIXTURES = {"tiny_run", "ema_run", "local_run", "trained_twice", "features"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") or PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.process)


class StartedAProcess(AssertionError):
    pass


_POPEN, _START = subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start
HARMLESS = {"uname"}  # (platform.processor(), which some trackers call on import)


def _refusing_popen(self, args, *rest, **kwargs):
    if isinstance(args, (list, tuple)) and args and os.path.basename(str(args[0])) in HARMLESS:
        return _POPEN(self, args, *rest, **kwargs)
    _refuse()


def _refuse(*args, **kwargs):
    raise StartedAProcess("this test (or a fixture it uses) starts a process: mark it @pytest.mark.process "
                          "(or add the fixture to PROCESS_FIXTURES in tests/conftest.py)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under `-m "not process"` (the fast tier) starting a process during a test (its fixtures
    included) fails it."""
    if "not process" not in (item.config.getoption("markexpr", "") or ""):
        return (yield)
    subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start = _refusing_popen, _refuse
    try:
        return (yield)
    finally:
        subprocess.Popen.__init__, multiprocessing.process.BaseProcess.start = _POPEN, _START


def train_tiny(run, shards, *overrides) -> Path:
    """launch/train.py on the tiny nets in a subprocess (as users run it); fails the test on error."""
    import subprocess

    args = [*TINY, f"run.dir={run}", f"data.train={shards}", *overrides]
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(run)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Waits for `proc` (started with start_new_session=True); on timeout kills its whole session
    and fails the test: (returncode, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for more than {timeout} s; stderr tail:\n{err[-3000:]}")
    return proc.returncode, out, err


def run_bounded(cmd, timeout: float, env=ENV) -> tuple[int, str, str]:
    """Runs `cmd` in its own session, bounded by `timeout` (see `finish`)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return finish(proc, timeout)


def weights(run) -> dict:
    """The three nets a run exported (run/model/*.safetensors), as float32, keyed `net.tensor`."""
    from safetensors.torch import load_file

    return {f"{name}.{k}": t.float() for name in NETS
            for k, t in load_file(Path(run) / "model" / f"{name}.safetensors").items()}


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits16"
    build_shards("digits", out=str(out), resolution=16)
    return out


@pytest.fixture(scope="session")
def small_features(tmp_path_factory):
    """A tiny TorchScript feature extractor (images in [-1, 1] -> 8-d vectors)."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.Tanh(), nn.Conv2d(8, 8, 3, 2, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path_factory.mktemp("features") / "small.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x
        torch.jit.script(net).save(str(path))
    return path
