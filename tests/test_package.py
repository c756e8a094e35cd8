"""bidvl as users install it: the wheel in a fresh virtual environment, used from an empty folder
(not the clone): the `bidvl` command and `python -m bidvl`, shipped configs by name, package data."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this tree; torch and the other dependencies come
    from the test environment through a .pth line (no network, no second copy of torch), and that
    environment's editable bidvl is not seen (a .pth file's own .pth files are not processed)."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((root / "dist").glob("bidvl-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=clean_env()).stdout.strip()
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, timeout=300, env=clean_env())
    # After the install: pip would otherwise see the test environment's bidvl and skip the wheel.
    Path(site, "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def clean_env() -> dict:
    """The environment without what would put another bidvl on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(venv: Path, cwd: Path, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = clean_env()
    env.update(OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_gives_a_command_that_trains_samples_and_evaluates(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    where = run(installed, work, "python", "-c", "import bidvl, bidvl.config as c; print(bidvl.__file__); "
                "print(bidvl.__version__); print(c.shipped_configs())")
    assert where.returncode == 0, where.stderr
    file, version, shipped = where.stdout.splitlines()
    assert Path(file).is_relative_to(installed) and not Path(file).is_relative_to(REPO)
    assert "cifar10" in shipped and "celeba128" in shipped and "digits" in shipped
    assert run(installed, work, "bidvl", "--version").stdout.strip() == f"bidvl {version}"
    help_text = run(installed, work, "bidvl", "--help").stdout
    assert all(c in help_text for c in ("train", "sample", "evaluate", "make-shards", "study"))

    # A shipped config by name; its digits shards are built in this folder on first use.
    tiny = ["model.latent_dim=8", "model.energy_width=8", "model.encoder_width=8", "model.generator_width=8",
            "train.batch_size=16", "data.num_workers=0", "train.max_steps=4", "log.every=2", "health.every=2",
            "health.num_images=16", "run.dir=runs/tiny"]
    p = run(installed, work, "bidvl", "train", "--config", "digits", *tiny)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (work / "shards/digits/meta.json").is_file() and (work / "runs/tiny/model/README.md").is_file()
    assert "training finished at step 4" in p.stdout
    p = run(installed, work, "python", "-m", "bidvl", "sample", "--run", "runs/tiny", "--num", "4", "--out", "s.png")
    assert p.returncode == 0 and (work / "s.png").is_file(), p.stderr[-3000:]
    p = run(installed, work, "bidvl", "evaluate", "--run", "runs/tiny", "--metrics", "rmse,ood", "--max-test", "40")
    assert p.returncode == 0, p.stderr[-3000:]
    assert '"eval/rmse"' in p.stdout and list((work / "runs/tiny/eval").glob("step_*.json"))
    p = run(installed, work, "bidvl", "make-shards", "digits", "--out", "shards/digits32", "--resolution", "32")
    assert p.returncode == 0 and (work / "shards/digits32/meta.json").is_file(), p.stderr[-3000:]
    p = run(installed, work, "bidvl", "train", "--help-config")
    assert p.returncode == 0 and "  train.max_steps = " in p.stdout

    # Mistakes: one line naming what exists.
    p = run(installed, work, "bidvl", "train", "--config", "cifar100")
    assert p.returncode == 2 and "config file cifar100 does not exist" in p.stderr and "cifar10," in p.stderr
    p = run(installed, work, "bidvl", "tran")
    assert p.returncode == 2 and "unknown command 'tran'" in p.stderr
    p = run(installed, work, "bidvl", "study", "--config", "nosuch")
    assert p.returncode == 2 and "fashion_mnist_health" in p.stderr, p.stderr
    assert sorted(x.name for x in work.iterdir()) == ["runs", "s.png", "shards"]  # nothing else written here
