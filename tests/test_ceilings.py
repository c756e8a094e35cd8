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
