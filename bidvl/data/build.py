"""`build_shards`: one call from a dataset on disk to a shards folder (used by make_shards.py).

Each source has a module with `load(src, resolution, split, **options) -> writer.Dataset`; this
file picks the module, checks the options it takes, and hands the result to `writer.write_dataset`.
"""

from __future__ import annotations

import inspect
import itertools
import os
from pathlib import Path

from . import celeba, cifar10, digits, fashion_mnist, imagefolder, svhn
from .writer import Dataset, Split, check_out_folder, write_dataset

DATASETS = ("digits", "fashion-mnist", "cifar10", "svhn", "celeba", "imagefolder")
MODULES = {
    "digits": digits,
    "fashion-mnist": fashion_mnist,
    "cifar10": cifar10,
    "svhn": svhn,
    "celeba": celeba,
    "imagefolder": imagefolder,
}


def dataset_options(dataset: str) -> dict:
    """The extra keyword options (beyond src, resolution, split) a dataset takes, with defaults."""
    parameters = inspect.signature(MODULES[dataset].load).parameters
    return {name: p.default for name, p in parameters.items()
            if name not in ("src", "resolution", "split")}


def limit_splits(dataset: Dataset, limit: int) -> None:
    """Keeps only the first `limit` samples of every split (for quick tests and smoke runs)."""
    if limit < 1:
        raise ValueError(f"--limit {limit}: expected a positive number of samples")
    dataset.splits = [Split(s.name, min(s.count, limit), itertools.islice(s.samples, limit))
                      for s in dataset.splits]


def build_shards(dataset: str, out: str | os.PathLike, src: str | os.PathLike | None = None,
                 resolution: int | None = None, split: str | None = None,
                 overwrite: bool = False, limit: int | None = None, **options) -> dict:
    """Writes the shards of `dataset` into the folder `out`; returns the meta.json written.

    `src`: where the source files are (see each module's docstring; digits needs none,
    fashion-mnist defaults to /usr/share/datasets/fashion-mnist). `resolution`: None for the
    dataset's default. `split`: one split name, or None for all the source's standard splits.
    `limit`: keep the first N samples of each split. `options`: dataset-specific (`fit` for
    fashion-mnist, `crop` for celeba, `channels` and `holdout` for imagefolder, `resample` where
    images are resized). meta.json `options` records src as given, resolution, limit (if any) and
    every dataset option that shaped the bytes.
    """
    if dataset not in MODULES:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    accepted = dataset_options(dataset)
    for name in options:
        if name not in accepted:
            takes = ", ".join(accepted) or "no extra options"
            raise ValueError(f"option {name!r} does not apply to {dataset} (it takes: {takes})")
    check_out_folder(Path(out), overwrite)
    kwargs = {"src": src, "split": split, **options}
    if resolution is not None:
        kwargs["resolution"] = resolution
    source = MODULES[dataset].load(**kwargs)
    if limit is not None:
        limit_splits(source, limit)
    recorded = {"src": None if src is None else str(src), "resolution": source.resolution}
    if limit is not None:
        recorded["limit"] = limit
    source.options = {**recorded, **source.options}
    return write_dataset(out, source, overwrite=overwrite)


def build_once(dataset: str, out: str | os.PathLike, resolution: int | None = None) -> bool:
    """Builds `dataset` into `out` unless `out/meta.json` exists; returns whether it built.

    Safe for processes that start at once on one machine (launch/study.py's parallel runs, two
    jobs sharing a first-use folder): the build holds an exclusive lock on `out/.build.lock` and
    re-checks meta.json under it, so one process builds and the others wait, then read its
    shards. Without the lock they would write the same temp names and one rename would fail.
    """
    import fcntl

    folder = Path(out)
    if (folder / "meta.json").is_file():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if (folder / "meta.json").is_file():
            return False
        build_shards(dataset, out=str(folder), resolution=resolution)
        return True
