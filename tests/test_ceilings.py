"""bidvl.ceilings: nets too big for the machine are a named ConfigError before the first step, not
an allocation traceback."""

import signal

import pytest

from conftest import REPO, TINY
from bidvl import ceilings
from bidvl.config import ConfigError, load_config


def trainer_for(tmp_path, digits16, *overrides):
    from bidvl.engine import Trainer

    return Trainer(load_config(REPO / "configs/digits.yaml", [*TINY, f"run.dir={tmp_path / 'run'}",
                                                              f"data.train={digits16}", *overrides]))


def test_nets_that_cannot_be_allocated_are_a_named_error(tmp_path, digits16):
    """A width whose weights exceed the machine (25.6 GB for one layer here): the allocation fails
    at once, reported with the widths to lower."""
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=r"^the nets cannot be allocated \(.*can't allocate memory.*\): lower "
                                          r"model.energy_width=20000, model.encoder_width=8"):
        trainer_for(tmp_path, digits16, "model.energy_width=20000")
    assert signal.getsignal(signal.SIGTERM) is handler  # the failed trainer put its stop handlers back


def test_nets_whose_training_state_exceeds_the_memory_are_refused_before_training(tmp_path, digits16, monkeypatch):
    """Weights that fit but, with gradients and Adam's moments (16 bytes a parameter), do not: the
    tiny nets (about 0.2 M parameters, 3.4 MB of state) against 1 MiB of memory."""
    monkeypatch.setattr(ceilings, "available_memory", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"^the nets need at least 0\.0 GiB before any activation \(energy 0\.\d M, "
                                          r"encoder 0\.\d M, generator 0\.\d M parameters x 16 bytes: weights, "
                                          r"gradients, Adam's moments\), the host has 0\.0 GiB: lower model.energy_width=8"):
        trainer_for(tmp_path, digits16)
    monkeypatch.undo()
    trainer_for(tmp_path, digits16).close()  # the real memory holds them


# ------------------------------------------------------------------ loader workers and the batch against the data


def test_more_loader_workers_than_the_cores_can_run_are_refused_before_any_starts(tmp_path, digits16, monkeypatch):
    from types import SimpleNamespace

    from bidvl.data.stream import ShardStream

    monkeypatch.setattr(ceilings, "usable_cores", lambda: 2)
    acc = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0, wait_for_everyone=lambda: None)
    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"data.train={digits16}", "data.num_workers=9"])
    with pytest.raises(ConfigError, match=r"^data.num_workers=9 loader workers per process, but this process may "
                                          r"run on 2 core\(s\): at most 8 \(4 a core\) are accepted; lower data.num_workers"):
        ShardStream(cfg, acc)
    ShardStream(load_config(REPO / "configs/digits.yaml", [*TINY, f"data.train={digits16}", "data.num_workers=8"]), acc)
    from bidvl.evaluation.evaluator import EvalOptions
    from bidvl.evaluation.loading import EvalError

    with pytest.raises(EvalError, match=r"^--num-workers 9 loader workers per process"):
        EvalOptions(num_workers=9)
    assert EvalOptions(num_workers=8).num_workers == 8


@pytest.mark.parametrize("processes, fits", [(1, "at most 1437"), (2, "at most 718"),
                                             (2000, "fewer processes: there are fewer images than processes")])
def test_a_global_batch_larger_than_the_split_is_refused_naming_the_count(digits16, processes, fits):
    """digits16's train split has 1437 images: a step of more would repeat images in every batch."""
    from types import SimpleNamespace

    from bidvl.data.stream import ShardStream

    acc = SimpleNamespace(is_main_process=True, num_processes=processes, process_index=0,
                          wait_for_everyone=lambda: None)
    batch = 1437 // processes + 1
    cfg = load_config(REPO / "configs/digits.yaml", [*TINY, f"data.train={digits16}", f"train.batch_size={batch}"])
    with pytest.raises(ConfigError, match=rf"^train.batch_size={batch} on {processes} process\(es\) takes "
                                          rf"{batch * processes} images a step, but split 'train' of "
                                          rf"{digits16 / 'meta.json'} has 1437: every batch would repeat "
                                          rf"images; lower train.batch_size \({fits}\)"):
        ShardStream(cfg, acc)
    if processes < 1437:
        ok = load_config(REPO / "configs/digits.yaml", [*TINY, f"data.train={digits16}", f"train.batch_size={batch - 1}"])
        ShardStream(ok, acc)


@pytest.mark.process
def test_the_trainer_and_evaluate_refuse_absurd_sizes_in_one_line(tmp_path, digits16):
    """The path users take: `bidvl train` / `bidvl evaluate` with 100000 loader workers (this
    machine would fork until it failed) and a batch larger than the data; one line, exit 2, nothing
    started."""
    from conftest import BIN, run_bounded

    base = [str(BIN / "bidvl"), "train", *TINY, f"run.dir={tmp_path / 'run'}", f"data.train={digits16}"]
    code, _, err = run_bounded([*base, "data.num_workers=100000"], timeout=120)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err[-2000:]
    assert err.startswith("error: data.num_workers=100000 loader workers per process, but this process may run on")
    code, _, err = run_bounded([*base, "train.batch_size=5000"], timeout=120)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "error: train.batch_size=5000 on 1 process(es) takes 5000 images a step" in err
    assert not list((tmp_path / "run").glob("checkpoints/step_*"))
    code, _, err = run_bounded([str(BIN / "bidvl"), "evaluate", "--run", str(tmp_path / "run"),
                                "--num-workers", "100000"], timeout=120)
    assert code == 2 and "Traceback" not in err and "--num-workers 100000 loader workers per process" in err, err
