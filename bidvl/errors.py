"""The base of every error bidvl raises for a user to read.

Each error names the file, key, option or step at fault and what was expected, in one line.
The command lines (`bidvl train|evaluate|sample|study`, launch/*.py) catch `BidvlError`, print
`error: <message>` and exit 2: bad input and a stopped run are answers, not tracebacks.

The subclasses live with the module that raises them and keep their standard base, so code that
caught `ValueError` or `FloatingPointError` before still does:

| error | raised by | also a |
|---|---|---|
| `bidvl.config.ConfigError` (`checkpoint.CheckpointError`, `DamagedCheckpoint`) | config, checkpoints, run folder | ValueError |
| `bidvl.data.ShardError` (`data/errors.py`; `remote.NotFound`) | shards folders, shards, members, remote sources | ValueError |
| `bidvl.evaluation.EvalError` | run folders to load, weights files, evaluation options | ValueError |
| `bidvl.study.StudyError` (`study/config.py`) | study files | ValueError |
| `bidvl.health.UnhealthyRun` | `health.on_unhealthy=stop` | RuntimeError |
| `bidvl.nonfinite.NonFiniteError` | `train.on_nonfinite` giving up | FloatingPointError |
| `bidvl.io.WriteError` | a write the file system refused: a file written whole or not at all, the trackers' logs | OSError |
"""


class BidvlError(Exception):
    """Bad input or a run that stopped by its own rules; the message says which and why."""
