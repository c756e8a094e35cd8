"""Shards: writers (one module per source, `build_shards`), the streaming reader and the
training stream the engine reads (`ShardStream`)."""

from .errors import ShardError
from .meta import read_meta, split_info
from .reader import EvalStream, TrainStream, eval_stream, train_stream
from .stream import ShardStream

__all__ = [
    "ShardError", "read_meta", "split_info", "TrainStream", "EvalStream", "train_stream",
    "eval_stream", "build_shards", "ShardStream",
]


def build_shards(*args, **kwargs):
    """See bidvl.data.build.build_shards (imported lazily: writers pull in scipy and sklearn)."""
    from .build import build_shards as _build

    return _build(*args, **kwargs)
