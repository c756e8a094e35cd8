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
import sys
from pathlib import Path

from ..io import write_text
from . import remote
from .errors import ShardError
from .tarstream import count_samples

FORMAT = "bidvl-shards/1"

# Shard-count rule: at least MIN_SHARDS shards per split (so that up to 16 ranks x 4 loader workers
# each get whole shards for evaluation), at most MAX_PER_SHARD samples per shard; a split with fewer
# samples than MIN_SHARDS gets one sample per shard.
MIN_SHARDS = 64
MAX_PER_SHARD = 5000


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def num_shards(count: int) -> int:
    if count <= 0:
        raise ShardError("cannot shard an empty split (0 samples)")
    return max(math.ceil(count / MAX_PER_SHARD), min(MIN_SHARDS, count))


def read_meta(folder: str | os.PathLike, net=None) -> dict:
    """Loads and checks `folder/meta.json`; every problem names the file and what was expected.
    `folder` may also be a remote source (bidvl.data.remote: a URL or a pipe: template)."""

    if remote.is_remote(folder):
        url = remote.member(str(folder), "meta.json")
        try:
            text = remote.read_bytes(url, net or remote.DEFAULT, what="meta.json")
        except remote.NotFound as exc:
            raise remote.NotFound(f"{exc}: {folder} is not a shards folder written by bidvl make-shards "
                             f"(no meta.json); shards written by another tool are read from a list "
                             f"of them, e.g. {str(folder).rstrip('/')}/{{000000..000099}}.tar") from None
        return check_meta(_json(text, url), url)
    folder = Path(remote.local_path(str(folder)))
    path = folder / "meta.json"
    if not folder.is_dir():
        raise ShardError(f"shards folder {folder} does not exist (build it with launch/make_shards.py)")
    if not path.is_file():
        raise ShardError(
            f"{path} is missing: {folder} is not a shards folder written by launch/make_shards.py"
        )
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ShardError(f"{path}: not readable JSON ({exc})") from None
    return check_meta(_json(text, path), path)


def _json(text: bytes, where) -> dict:
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{where}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: not a JSON object")
    return meta


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_meta(meta: dict, path) -> dict:
    for key in ("format", "resolution", "channels", "splits"):
        if key not in meta:
            raise ShardError(f"{path}: key {key!r} missing")
    if meta["format"] != FORMAT:
        raise ShardError(f"{path}: format {meta['format']!r}, expected {FORMAT!r}")
    if not _int_in(meta["resolution"], 1, 4096):
        raise ShardError(f"{path}: resolution {meta['resolution']!r}, expected an integer in [1, 4096]")
    if meta["channels"] not in (1, 3) or isinstance(meta["channels"], bool):
        raise ShardError(f"{path}: channels {meta['channels']!r}, expected 1 or 3")
    if not isinstance(meta["splits"], dict) or not meta["splits"]:
        raise ShardError(f"{path}: splits must be a non-empty object")
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or "count" not in info or "shards" not in info:
            raise ShardError(f"{path}: splits.{split} needs 'count' and 'shards'")
        if not isinstance(info["shards"], list) or not all(isinstance(x, dict) for x in info["shards"]):
            raise ShardError(f"{path}: splits.{split}.shards must be a list of objects")
        for i, shard in enumerate(info["shards"]):  # a count of 0 would divide by zero later
            if not _int_in(shard.get("count"), 1, MAX_PER_SHARD):
                raise ShardError(f"{path}: splits.{split}.shards[{i}].count {shard.get('count')!r}, expected "
                                 f"an integer in [1, {MAX_PER_SHARD}]")
        # An empty split (no shards, count 0) is allowed here; split_info refuses it when used.
        if not _int_in(info["count"], 0, 2**31 - 1) or sum(s["count"] for s in info["shards"]) != info["count"]:
            raise ShardError(f"{path}: splits.{split}: shard counts do not add up to 'count'")
        for s in info["shards"]:
            name = s.get("name", "")
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                # meta.json may only name files inside its own folder: no paths, no "..".
                raise ShardError(f"{path}: shard name {name!r} is not a plain file name")
    return meta


FOREIGN = "webdataset"  # meta["format"] of shards without a meta.json (written by other tools)


def is_foreign_folder(source) -> bool:
    """True for a local folder without meta.json that holds tar shards: a WebDataset written by
    another tool (img2dataset, webdataset's ShardWriter, ...)."""

    if remote.is_remote(source) or remote.is_list(str(source)):
        return False
    folder = Path(remote.local_path(str(source)))
    return folder.is_dir() and not (folder / "meta.json").exists() and \
        (any(folder.glob("*.tar")) or any(folder.glob("*/*.tar")))


def foreign_shards(folder: Path, split: str) -> list[Path]:
    """The shards of `split` in a folder without meta.json: `<split>/*.tar`, else the tars named
    `<split>-*.tar` or `<split>_*.tar`, else, for split "train" only, every `*.tar` of the folder
    (the common case: one folder of training shards); sorted by name."""
    for found in (sorted((folder / split).glob("*.tar")) if (folder / split).is_dir() else [],
                  sorted(p for p in folder.glob("*.tar") if p.name.startswith((f"{split}-", f"{split}_")))):
        if found:
            return found
    tars = sorted(folder.glob("*.tar"))
    if split == "train":
        return tars
    raise ShardError(f"{folder}: no shards of split {split!r} (no meta.json; its {len(tars)} tar files "
                     f"are split 'train'; name held-out shards {split}-*.tar or put them in {split}/)")


def _foreign_meta(where, split: str, shards: list, net, count: int, resolution: int, channels: int):
    """meta, shards, per-shard counts of shards without a meta.json; the counts are read from the
    shards (headers only for local ones, one download each for remote ones) unless `count` gives
    the total (per-shard counts are then None)."""

    if not resolution or not channels:
        raise ShardError(f"{where}: shards without a meta.json are read at data.resolution and "
                         f"data.channels, which the caller did not give")
    counts = None
    if count <= 0:
        if any(isinstance(s, str) for s in shards):  # remote: each is downloaded once to count it
            print(f"counting the samples of {len(shards)} shards of {where} (no meta.json; "
                  f"data.train_count skips this)", file=sys.stderr, flush=True)
        counts = [count_samples(s, net) for s in shards]
        empty = [s for s, c in zip(shards, counts) if c == 0]
        if empty:
            raise ShardError(f"shard {empty[0]}: holds no samples")
        count = sum(counts)
    entries = [{"name": Path(str(s)).name} if counts is None else {"name": Path(str(s)).name, "count": c}
               for s, c in zip(shards, counts or [0] * len(shards))]
    meta = {"format": FOREIGN, "resolution": resolution, "channels": channels, "num_classes": None,
            "splits": {split: {"count": count, "shards": entries}}}
    return meta, shards, counts


def split_info(folder: str | os.PathLike, split: str, net=None, count: int = 0, resolution: int = 0,
               channels: int = 0) -> tuple[dict, list, list[int] | None]:
    """(meta, shards, per-shard counts) for one split; errors name the source and split.

    `folder` is a shards folder (local path, URL or pipe: template: its meta.json lists the
    shards) or an explicit shard list `.../train-{000000..000003}.tar`, whose counts come from the
    meta.json beside the shards, or, given `count` > 0 (data.train_count), from the caller (per-shard
    counts are then None: training needs only the total). A local folder without meta.json, or a
    list without one beside it, holds shards written by another tool (`foreign_shards`; meta
    format FOREIGN): their images are fitted to `resolution` and `channels` (data.resolution,
    data.channels) as they are read, and their counts are read from the shards. Local shards are
    Paths (memory-mapped), remote ones URL or command strings. http(s) shards are checked to exist
    (HEAD) here, so a missing one fails before training starts."""

    net = net or remote.DEFAULT
    source = str(folder)
    if remote.is_list(source):
        return _list_info(source, split, net, count, resolution, channels)
    if is_foreign_folder(source):
        folder = Path(remote.local_path(source))
        shards = foreign_shards(folder, split)
        return _foreign_meta(folder, split, shards, net, count, resolution, channels)
    meta = read_meta(folder, net)
    where = remote.member(source, "meta.json") if remote.is_remote(source) else \
        Path(remote.local_path(source)) / "meta.json"
    if split not in meta["splits"]:
        raise ShardError(f"{where}: no split {split!r} (has {', '.join(meta['splits'])})")
    info = meta["splits"][split]
    if not info["shards"]:
        raise ShardError(f"{where}: split {split!r} lists no shards")
    names = [s["name"] for s in info["shards"]]
    if remote.is_remote(source):
        shards = [remote.member(source, name) for name in names]
        _check_remote(shards, net, f"listed in {where}")
    else:
        shards = [Path(remote.local_path(source)) / name for name in names]
        _check_local(shards, "listed in meta.json")
    return meta, shards, [s["count"] for s in info["shards"]]


def _check_local(paths, why: str) -> None:
    for p in paths:
        if not p.exists():
            raise ShardError(f"shard {p} {why} is missing")
        if not p.is_file():
            raise ShardError(f"shard {p} {why} is not a regular file")


def _check_remote(urls, net, why: str) -> None:
    """HEAD-checks http(s) shards (other remote sources cannot be checked without reading them)."""

    for url in urls:
        try:
            remote.check_exists(url, net)
        except remote.NotFound as exc:
            raise ShardError(f"shard {exc} ({why})") from None


def _list_info(source: str, split: str, net, count: int, resolution: int, channels: int):
    """An explicit shard list: counts from the meta.json beside the shards when there is one (and
    `count` is 0), else read as shards without a meta.json (`_foreign_meta`)."""

    urls = remote.expand(source)
    if len(set(urls)) != len(urls):
        raise ShardError(f"{source}: names the same shard twice")
    remote_list = remote.is_remote(urls[0])
    shards = urls if remote_list else [Path(remote.local_path(u)) for u in urls]
    if remote_list:
        _check_remote(urls, net, f"listed in {source}")
    else:
        _check_local(shards, f"of {source}")
    folders = {remote.parent(u) for u in urls}
    meta = None
    if count <= 0 and not remote.is_pipe(source) and len(folders) == 1:
        folder = folders.pop()
        try:
            meta = read_meta(folder, net)
        except remote.NotFound:
            meta = None
        except ShardError:
            if remote_list or (Path(remote.local_path(folder)) / "meta.json").exists():
                raise
            meta = None  # a local folder without meta.json
        where = remote.member(folder, "meta.json") if remote_list else Path(folder) / "meta.json"
    if meta is None:
        return _foreign_meta(source, split, shards, net, count, resolution, channels)
    if split not in meta["splits"]:
        raise ShardError(f"{where}: no split {split!r} (has {', '.join(meta['splits'])})")
    known = {s["name"]: s for s in meta["splits"][split]["shards"]}
    missing = [u for u in urls if remote.basename(u) not in known]
    if missing:
        raise ShardError(f"shard {missing[0]} of {source} is not listed in {where} "
                         f"(split {split!r})")
    entries = [known[remote.basename(u)] for u in urls]  # with their sha256, when recorded
    counts = [e["count"] for e in entries]
    meta = {**meta, "splits": {split: {"count": sum(counts), "shards": entries}}}
    return meta, shards, counts


def write_meta(folder: str | os.PathLike, meta: dict) -> None:
    """Atomically writes meta.json (temp file, fsync, rename)."""
    write_text(Path(folder) / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=True) + "\n",
               fsync=True)
