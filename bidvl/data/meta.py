"""The shards folder contract, shared by the writers and the reader.

A shards folder holds `<split>-000000.tar ...` and `meta.json`:

    {
      "format": "bidvl-shards/1",
      "source": "digits",                 # dataset name given to make_shards
      "resolution": 32, "channels": 1,
      "num_classes": 10,                  # null when samples carry no `cls`
      "options": {...},                   # every option that shaped the bytes (src, crop, ...)
      "splits": {"train": {"count": 1437,
                           "shards": [{"name": "train-000000.tar", "count": 23}, ...]}, ...}
    }

Each sample is `{__key__, png[, cls]}`: a PNG at the final resolution (mode L or RGB) and the
class id as ASCII digits. Per-shard counts let the reader give every rank the same number of
batches without reading the data first.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

FORMAT = "bidvl-shards/1"

# Shard-count rule: at least MIN_SHARDS shards per split (so that up to 16 ranks x 4 loader workers
# each get whole shards for evaluation), at most MAX_PER_SHARD samples per shard; a split with fewer
# samples than MIN_SHARDS gets one sample per shard.
MIN_SHARDS = 64
MAX_PER_SHARD = 5000


class ShardError(ValueError):
    """A shards folder, shard or member is not what the reader or writer expected."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def num_shards(count: int) -> int:
    if count <= 0:
        raise ShardError("cannot shard an empty split (0 samples)")
    return max(math.ceil(count / MAX_PER_SHARD), min(MIN_SHARDS, count))


def read_meta(folder: str | os.PathLike) -> dict:
    """Loads and checks `folder/meta.json`; every problem names the file and what was expected."""
    folder = Path(folder)
    path = folder / "meta.json"
    if not folder.is_dir():
        raise ShardError(f"shards folder {folder} does not exist (build it with launch/make_shards.py)")
    if not path.is_file():
        raise ShardError(
            f"{path} is missing: {folder} is not a shards folder written by launch/make_shards.py"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: not readable JSON ({exc})") from None
    for key in ("format", "resolution", "channels", "splits"):
        if key not in meta:
            raise ShardError(f"{path}: key {key!r} missing")
    if meta["format"] != FORMAT:
        raise ShardError(f"{path}: format {meta['format']!r}, expected {FORMAT!r}")
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or "count" not in info or "shards" not in info:
            raise ShardError(f"{path}: splits.{split} needs 'count' and 'shards'")
        if sum(s["count"] for s in info["shards"]) != info["count"]:
            raise ShardError(f"{path}: splits.{split}: shard counts do not add up to 'count'")
    return meta


def split_info(folder: str | os.PathLike, split: str) -> tuple[dict, list[Path], list[int]]:
    """(meta, shard paths, per-shard counts) for one split; errors name the folder and split."""
    meta = read_meta(folder)
    if split not in meta["splits"]:
        raise ShardError(
            f"{Path(folder) / 'meta.json'}: no split {split!r} (has {', '.join(meta['splits'])})"
        )
    info = meta["splits"][split]
    if not info["shards"]:
        raise ShardError(f"{Path(folder) / 'meta.json'}: split {split!r} lists no shards")
    for s in info["shards"]:
        name = s.get("name", "")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            # meta.json may only name files inside its own folder: no paths, no "..".
            raise ShardError(f"{Path(folder) / 'meta.json'}: shard name {name!r} is not a plain file name")
    paths = [Path(folder) / s["name"] for s in info["shards"]]
    for p in paths:
        if not p.exists():
            raise ShardError(f"shard {p} listed in meta.json is missing")
        if not p.is_file():
            raise ShardError(f"shard {p} listed in meta.json is not a regular file")
    return meta, paths, [s["count"] for s in info["shards"]]


def write_meta(folder: str | os.PathLike, meta: dict) -> None:
    """Atomically writes meta.json (temp file, fsync, rename)."""
    path = Path(folder) / "meta.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, **meta}, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
