"""Writes a shards folder (see `bidvl/data/meta.py` for the format) from in-memory samples.

The per-source modules (`digits.py`, `cifar10.py`, ...) turn a dataset on disk into a `Dataset`:
one `Split` per split, each an ordered stream of `(key, image, cls)` at the final resolution.
`write_dataset` turns that into `<split>-000000.tar ...` plus `meta.json`:

- Each sample is two tar members, `KEY.png` (lossless PNG, mode L or RGB) and `KEY.cls` (the
  class id in ASCII digits, only when the class is known).
- Samples go to `meta.num_shards(count)` shards in order, contiguous, sizes differing by at most 1.
- Identical input gives identical bytes: fixed member order, fixed tar headers (mtime 0, uid/gid 0,
  empty user/group names, mode 0o644, GNU format) and fixed PNG settings with no ancillary chunks
  (no time stamp, no ICC profile, no dpi). Bytes can differ across zlib versions.
- Nothing is replaced until everything is written: all shards go to hidden temp files
  (`.train-000000.tar.tmp`), are flushed and fsynced, and only when every split is complete are
  they renamed into place; `meta.json` is written last. A source that fails midway leaves the
  folder exactly as it was.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..io import file_sha256, fsync_folder
from .meta import ShardError, num_shards, read_meta, shard_name, write_meta

PNG_COMPRESS_LEVEL = 6
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
SPLIT_PATTERN = re.compile(r"[A-Za-z0-9_]+")
SHARD_PATTERN = re.compile(r"(?P<split>[^.].*)-(?P<index>\d{6})\.tar")

# One sample: (key, image, class id or None). The image is a PIL image or a uint8 array, HxW or
# HxWxC with C in (1, 3), already at the final resolution.
Sample = tuple[str, "Image.Image | np.ndarray", "int | None"]


@dataclass
class Split:
    """One split of a source: its name, its exact sample count and the ordered samples."""

    name: str
    count: int
    samples: Iterable[Sample]


@dataclass
class Dataset:
    """What a source module hands to the writer; `options`: all that shaped the bytes."""

    source: str
    resolution: int
    channels: int
    num_classes: int | None
    splits: list[Split]
    options: dict = field(default_factory=dict)


def index_key(split: str, index: int) -> str:
    """The sample key used when the source has no natural name: `train_0000042`."""
    return f"{split}_{index:07d}"


def shard_sizes(count: int) -> list[int]:
    """How many samples go to each shard: `num_shards(count)` sizes, as even as possible."""
    n = num_shards(count)
    base, extra = divmod(count, n)
    return [base + 1 if i < extra else base for i in range(n)]


def png_bytes(image: Image.Image | np.ndarray, resolution: int, channels: int) -> bytes:
    """Encodes one image as PNG (mode L or RGB) after checking its size and channel count."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    expected = (resolution, resolution) if channels == 1 else (resolution, resolution, 3)
    if array.dtype != np.uint8 or array.shape != expected:
        raise ShardError(
            f"image of shape {array.shape} and dtype {array.dtype}, expected uint8 {expected}"
        )
    # A fresh image carries no metadata from the source file (ICC profile, transparency, dpi).
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Adds one file to the tar with fixed metadata, so that output bytes depend on data only."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterator[Sample], size: int, resolution: int, channels: int,
                state: dict, progress: tqdm) -> None:
    """Writes the next `size` samples to one tar file at `path`, then flushes and fsyncs it."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for _ in range(size):
                try:
                    key, image, cls = next(samples)
                except StopIteration:
                    raise ShardError(
                        f"split {state['split']!r}: the source ended after {state['written']} "
                        f"samples, expected {state['count']}"
                    ) from None
                check_key(key, state)
                try:
                    add_member(tar, f"{key}.png", png_bytes(image, resolution, channels))
                except ShardError as exc:
                    raise ShardError(f"sample {key!r}: {exc}") from None
                if cls is not None:
                    add_member(tar, f"{key}.cls", str(int(cls)).encode("ascii"))
                state["written"] += 1
                progress.update(1)
        f.flush()
        os.fsync(f.fileno())


def check_key(key: str, state: dict) -> None:
    """Keys are plain names (letters, digits, `_`, `-`) in strictly increasing order in a split."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ShardError(f"sample key {key!r}: only letters, digits, '_' and '-' are allowed")
    if state["last_key"] is not None and key <= state["last_key"]:
        raise ShardError(
            f"sample key {key!r} after {state['last_key']!r}: keys must be unique and sorted"
        )
    state["last_key"] = key


def write_split_to_temp(folder: Path, split: Split, resolution: int, channels: int,
                        temps: list[tuple[Path, Path]]) -> dict:
    """Writes one split's shards to temp files (recorded in `temps` as (temp, final) pairs).

    Returns the split's meta.json entry: {"count": N, "shards": [{"name": ..., "count": ...,
    "sha256": ...}]}. The digests let a reader of a remote copy know what it holds without reading
    it (the FID reference statistics' cache key, bidvl.evaluation.fid.reference_key).
    """
    if split.count <= 0:
        raise ShardError(f"split {split.name!r} has no samples")
    samples = iter(split.samples)
    state = {"split": split.name, "count": split.count, "written": 0, "last_key": None}
    shards = []
    with tqdm(total=split.count, desc=f"{split.name}", unit="img", disable=None) as progress:
        for index, size in enumerate(shard_sizes(split.count)):
            final = folder / shard_name(split.name, index)
            temp = folder / f".{final.name}.tmp"
            temps.append((temp, final))
            write_shard(temp, samples, size, resolution, channels, state, progress)
            shards.append({"name": final.name, "count": size, "sha256": file_sha256(temp)})
    if next(samples, None) is not None:
        raise ShardError(f"split {split.name!r}: the source has more than {split.count} samples")
    return {"count": split.count, "shards": shards}


def existing_shards(folder: Path) -> list[Path]:
    """Files in `folder` named like shards (`<split>-NNNNNN.tar`), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.fullmatch(p.name))


def check_out_folder(folder: Path, overwrite: bool) -> None:
    """Refuses an `out` that is a file, or that already holds shards unless `overwrite`."""
    if folder.exists() and not folder.is_dir():
        raise ShardError(f"--out {folder} exists and is not a folder")
    if overwrite:
        return
    old = existing_shards(folder)
    if (folder / "meta.json").exists() or old:
        found = "meta.json" if (folder / "meta.json").exists() else old[0].name
        raise ShardError(
            f"--out {folder} already holds shards ({found}); pass --overwrite to replace them"
        )


def kept_splits(folder: Path, meta: dict, written: set[str]) -> dict:
    """Splits of the old meta.json to keep: those not rewritten, if built the same way."""
    try:
        old = read_meta(folder)
    except ShardError:
        return {}
    same = ("source", "resolution", "channels", "num_classes", "options")
    if any(old.get(k) != meta.get(k) for k in same):
        return {}
    return {name: info for name, info in old["splits"].items() if name not in written}


def write_dataset(out: str | os.PathLike, dataset: Dataset, overwrite: bool = False) -> dict:
    """Writes every split of `dataset` into the folder `out` and returns the meta.json written.

    `out` must not already hold shards or meta.json unless `overwrite`. With `overwrite`, the
    splits written replace their old shards (stale higher-numbered shards are removed); other
    splits listed in the old meta.json are kept when it has the same source, resolution, channels,
    classes and options, and are removed otherwise. Old files are touched only once all new
    shards are complete.
    """
    folder = Path(out)
    check_out_folder(folder, overwrite)
    for split in dataset.splits:
        if not SPLIT_PATTERN.fullmatch(split.name):
            raise ShardError(f"split name {split.name!r}: only letters, digits and '_' allowed")
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "source": dataset.source,
        "resolution": dataset.resolution,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "options": dataset.options,
    }
    temps: list[tuple[Path, Path]] = []
    splits = {}
    try:
        for split in dataset.splits:
            splits[split.name] = write_split_to_temp(
                folder, split, dataset.resolution, dataset.channels, temps
            )
    except BaseException:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)
        raise
    splits = {**kept_splits(folder, meta, set(splits)), **splits}
    # From here on only renames and deletions: without meta.json the folder reads as "not built"
    # rather than as a mix of old counts and new shards, should the process die halfway.
    (folder / "meta.json").unlink(missing_ok=True)
    fsync_folder(folder)
    for temp, final in temps:
        os.replace(temp, final)
    keep = {s["name"] for info in splits.values() for s in info["shards"]}
    for path in existing_shards(folder):
        if path.name not in keep:
            path.unlink()
    fsync_folder(folder)
    meta["splits"] = splits
    write_meta(folder, meta)
    return read_meta(folder)


# Image helpers shared by the source modules.

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def resample_filter(name: str) -> Image.Resampling:
    """The PIL filter for a `--resample` name (bicubic, bilinear, lanczos, nearest)."""
    if name not in RESAMPLE:
        raise ValueError(f"--resample {name!r}: expected one of {', '.join(RESAMPLE)}")
    return RESAMPLE[name]


def check_resolution(resolution: int, low: int = 8, high: int = 1024) -> int:
    """An output resolution must be an int in [low, high]."""
    if not isinstance(resolution, int) or not low <= resolution <= high:
        raise ValueError(f"--resolution {resolution!r}: expected an integer from {low} to {high}")
    return resolution


def center_crop(image: Image.Image, size: int, name: str) -> Image.Image:
    """The central `size` x `size` square (offsets rounded as torchvision's CenterCrop does)."""
    width, height = image.size
    if width < size or height < size:
        raise ShardError(f"{name}: image is {width}x{height}, smaller than the {size}x{size} crop")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def decode_image(data: bytes | os.PathLike, name: str) -> Image.Image:
    """Opens and fully decodes an image file (path or bytes); errors name the file."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ShardError(f"{name}: not a readable image ({exc})") from None
    return image
