"""One error base: every error bidvl raises for a user is a BidvlError, and the command lines
catch that base (one line, exit 2)."""

import importlib
import inspect
import pkgutil

import pytest

import bidvl
from bidvl.errors import BidvlError

# Exceptions that never reach a user: control flow inside a module.
INTERNAL = {"bidvl.data.remote._Transient", "bidvl.stopping.StopRequested"}


def bidvl_exceptions():
    found = {}
    for info in pkgutil.walk_packages(bidvl.__path__, "bidvl."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("bidvl"):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_every_error_of_bidvl_has_the_base_and_keeps_its_standard_one():
    found = bidvl_exceptions()
    assert {"bidvl.config.ConfigError", "bidvl.data.errors.ShardError", "bidvl.evaluation.loading.EvalError",
            "bidvl.study.config.StudyError", "bidvl.health.UnhealthyRun", "bidvl.nonfinite.NonFiniteError",
            "bidvl.checkpoint.DamagedCheckpoint", "bidvl.data.remote.NotFound"} <= set(found)
    outside = sorted(name for name, cls in found.items()
                     if name not in INTERNAL and not issubclass(cls, BidvlError))
    assert outside == [], f"errors without the BidvlError base: {outside}"
    standard = {"ConfigError": ValueError, "ShardError": ValueError, "EvalError": ValueError,
                "StudyError": ValueError, "UnhealthyRun": RuntimeError, "NonFiniteError": FloatingPointError}
    for name, cls in found.items():
        if name.rsplit(".", 1)[1] in standard:
            assert issubclass(cls, standard[name.rsplit(".", 1)[1]]), name


@pytest.mark.parametrize("module", ["bidvl.cli.train", "bidvl.cli.evaluate", "bidvl.cli.sample", "bidvl.cli.study"])
def test_the_command_lines_catch_the_base(module):
    source = inspect.getsource(importlib.import_module(module))
    assert "except BidvlError" in source
    for name in ("ConfigError, ShardError", "EvalError, ShardError", "FloatingPointError", "UnhealthyRun"):
        assert name not in source, f"{module} still catches a tuple of error classes ({name})"


def test_a_study_error_from_the_study_command_is_one_line(tmp_path, capsys):
    from bidvl.cli.study import main

    bad = tmp_path / "study.yaml"
    bad.write_text("base: digits\nruns: []\nunknown_key: 1\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(bad) in err
