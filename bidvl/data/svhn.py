"""SVHN cropped digits (Netzer et al. 2011), "Format 2": 32x32 RGB, 10 classes.

Expected in `src` (a folder), the official MATLAB files `train_32x32.mat` (73257 images),
`test_32x32.mat` (26032) and, only when asked for with `--split extra`, `extra_32x32.mat` (531131).
Each holds X (uint8, 32 x 32 x 3 x N) and y (N x 1, labels 1..10 where 10 means the digit 0; we
write 0). Without `--split`, `train` and `test` are written. Output: 32x32 RGB, no resizing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bidvl.extras import require

from .meta import ShardError
from .writer import Dataset, Split, index_key

SPLITS = ("train", "test", "extra")
DEFAULT_SPLITS = ("train", "test")
SIZE = 32


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3, labels N in 0..9) from one `<split>_32x32.mat` file."""
    loadmat = require("scipy.io", ShardError).loadmat

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected the official SVHN {path.name})")
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for a bad file
        raise ShardError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})"
                         ) from None
    if "X" not in mat or "y" not in mat:
        raise ShardError(f"{path}: expected variables X and y")
    images, labels = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (SIZE, SIZE, 3):
        raise ShardError(f"{path}: X is {images.dtype} {images.shape}, "
                         f"expected uint8 (32, 32, 3, N)")
    if len(labels) != images.shape[3]:
        raise ShardError(f"{path}: {images.shape[3]} images but {len(labels)} labels in y")
    if labels.size and not 1 <= labels.min() <= labels.max() <= 10:
        raise ShardError(f"{path}: y must hold labels 1..10, found {labels.min()}..{labels.max()}")
    return images, labels.astype(np.int64) % 10


def samples(images: np.ndarray, labels: np.ndarray, split: str):
    for index in range(images.shape[3]):
        yield index_key(split, index), images[:, :, :, index], int(labels[index])


def load(src=None, resolution: int = 32, split: str | None = None) -> Dataset:
    """SVHN as a `Dataset`; `src` is the folder with the `*_32x32.mat` files."""
    if src is None:
        raise ValueError("svhn needs --src: a folder with train_32x32.mat and test_32x32.mat "
                         "(SVHN Format 2, from the SVHN homepage)")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder (expected the SVHN .mat files)")
    if resolution != SIZE:
        raise ValueError(f"--resolution {resolution}: svhn is written at its native 32")
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split {split!r}: svhn has splits {', '.join(SPLITS)}")
    splits = []
    for name in DEFAULT_SPLITS if split is None else (split,):
        images, labels = read_mat(src / f"{name}_32x32.mat")
        splits.append(Split(name, len(labels), samples(images, labels, name)))
    return Dataset("svhn", SIZE, 3, 10, splits, {"labels": "10 -> 0"})
