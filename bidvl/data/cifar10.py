"""CIFAR-10 (Krizhevsky 2009): 32x32 RGB, 10 classes, 50000 train / 10000 test.

`src` is the official "CIFAR-10 python version": either the archive `cifar-10-python.tar.gz`, or
its extracted folder `cifar-10-batches-py` (or a folder that contains it). Inside are the pickled
batches `data_batch_1` ... `data_batch_5` (train, in that order) and `test_batch` (test); each is
a dict with b"data" (uint8 array N x 3072, rows of R then G then B planes, 32x32 each, row-major)
and b"labels" (N ints in 0..9).

The batches are Python pickles, read only from the file the user names. The unpickler here accepts
nothing but numpy arrays, dtypes and plain containers, so a tampered file cannot run code.
Output: 32x32 RGB (no resizing), splits `train` and `test`.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from .meta import ShardError
from .writer import Dataset, Split, index_key

FOLDER = "cifar-10-batches-py"
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SIZE = 32

# The only globals a CIFAR batch pickle refers to (numpy 1.x and 2.x spellings).
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return super().find_class(module, name)


def unpickle_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 32 x 32 x 3 uint8, labels N) from the bytes of one batch file."""
    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a CIFAR batch"
        raise ShardError(f"{name}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})"
                         ) from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ShardError(f"{name}: expected a dict with keys b'data' and b'labels', got {keys}")
    images = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * SIZE * SIZE:
        raise ShardError(f"{name}: b'data' is {images.dtype} {images.shape}, "
                         f"expected uint8 (N, {3 * SIZE * SIZE})")
    labels_ok = labels.size == 0 or 0 <= labels.min() <= labels.max() <= 9
    if labels.shape != (len(images),) or not labels_ok:
        raise ShardError(f"{name}: b'labels' must be {len(images)} ints in 0..9")
    images = images.reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
    return images, labels.astype(np.int64)


def batch_reader(src: Path):
    """A function name -> bytes of one batch file, reading from the folder or the .tar.gz."""
    if src.is_file():
        try:
            archive = tarfile.open(src, "r:gz")
        except (tarfile.TarError, OSError) as exc:
            raise ShardError(f"--src {src}: not a readable cifar-10-python.tar.gz ({exc})"
                             ) from None
        names = set(archive.getnames())

        def read(name: str) -> bytes:
            member = f"{FOLDER}/{name}"
            if member not in names:
                raise ShardError(f"{src}: member {member} is missing (expected the official "
                                 f"cifar-10-python.tar.gz)")
            return archive.extractfile(member).read()

        return read
    folder = src / FOLDER if (src / FOLDER).is_dir() else src
    if not (folder / "batches.meta").is_file() and not (folder / "data_batch_1").is_file():
        raise ShardError(f"--src {src}: not a {FOLDER} folder (no data_batch_1 inside)")

    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise ShardError(f"{path} is missing (expected {FOLDER}/{name})")
        return path.read_bytes()

    return read


def read_split(read, src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All batches of one split, concatenated in the official order."""
    parts = [unpickle_batch(read(name), f"{src}:{name}") for name in BATCHES[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def samples(images, labels, split: str):
    for index, (image, label) in enumerate(zip(images, labels)):
        yield index_key(split, index), image, int(label)


def load(src=None, resolution: int = 32, split: str | None = None) -> Dataset:
    """CIFAR-10 as a `Dataset`; `src` is the tar.gz or the cifar-10-batches-py folder."""
    if src is None:
        raise ValueError("cifar10 needs --src: cifar-10-python.tar.gz or its cifar-10-batches-py "
                         "folder (CIFAR-10 python version, from the CIFAR homepage)")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"--src {src}: no such file or folder")
    if resolution != SIZE:
        raise ValueError(f"--resolution {resolution}: cifar10 is written at its native 32")
    if split is not None and split not in BATCHES:
        raise ValueError(f"--split {split!r}: cifar10 has splits {', '.join(BATCHES)}")
    read = batch_reader(src)
    splits = []
    for name in BATCHES if split is None else (split,):
        images, labels = read_split(read, src, name)
        splits.append(Split(name, len(images), samples(images, labels, name)))
    return Dataset("cifar10", SIZE, 3, 10, splits, {})
