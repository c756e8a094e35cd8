"""Fashion-MNIST (Zalando): 28x28 grey images of clothes, 10 classes, 60000 train / 10000 test.

Expected in `src` (default /usr/share/datasets/fashion-mnist), the four official gzipped IDX files:

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

IDX: big-endian int32 magic (2051 images, 2049 labels), int32 count, then for images int32 rows
and cols, then uint8 data. The 28x28 images become `resolution` x `resolution` by `fit`:
`pad` (default) adds (resolution - 28) / 2 pixels of background (0) on each side, so 32 gives
2 px each side; `resize` scales with PIL (bicubic by default). Splits: `train` and `test`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

from .meta import ShardError
from .writer import Dataset, Split, check_resolution, index_key, resample_filter

DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
FILES = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
SIZE = 28
FITS = ("pad", "resize")


def read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """Reads one gzipped IDX file of uint8 data with `dims` dimensions; checks magic and size."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (expected the official Fashion-MNIST file)")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ShardError(f"{path}: not a readable gzip file ({exc})") from None
    header_size = 4 * (1 + dims)
    if len(data) < header_size:
        raise ShardError(f"{path}: {len(data)} bytes, too short for an IDX header")
    header = np.frombuffer(data[:header_size], dtype=">i4")
    if header[0] != magic:
        raise ShardError(f"{path}: IDX magic {header[0]}, expected {magic}")
    shape = tuple(int(n) for n in header[1:])
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        raise ShardError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_split(src: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28, labels N) of one split; checks that they agree."""
    prefix = FILES[split]
    images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz", IMAGES_MAGIC, 3)
    labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz", LABELS_MAGIC, 1)
    if images.shape[1:] != (SIZE, SIZE):
        raise ShardError(f"{src}/{prefix}-images-idx3-ubyte.gz: images {images.shape[1:]}, "
                         f"expected ({SIZE}, {SIZE})")
    if len(images) != len(labels):
        raise ShardError(f"{src}: {split} has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ShardError(f"{src}/{prefix}-labels-idx1-ubyte.gz: label {labels.max()} > 9")
    return images, labels


def samples(images, labels, split: str, resolution: int, fit: str, resample: str):
    """Yields (key, image, cls), each 28x28 image padded with background (0) or resized."""
    if fit == "pad":
        margin = (resolution - SIZE) // 2
        images = np.pad(images, ((0, 0), (margin, margin), (margin, margin)))
    for index, (image, label) in enumerate(zip(images, labels)):
        if fit == "resize":
            image = Image.fromarray(image).resize((resolution, resolution),
                                                  resample_filter(resample))
        yield index_key(split, index), image, int(label)


def load(src=None, resolution: int = 32, split: str | None = None, fit: str = "pad",
         resample: str = "bicubic") -> Dataset:
    """Fashion-MNIST as a `Dataset` (see the module docstring for files and options)."""
    src = Path(DEFAULT_SRC if src is None else src)
    if not src.is_dir():
        raise FileNotFoundError(
            f"--src {src}: no such folder (expected the four Fashion-MNIST .gz files)"
        )
    if fit not in FITS:
        raise ValueError(f"fit {fit!r}: expected pad or resize")
    check_resolution(resolution)
    if fit == "pad" and (resolution < SIZE or (resolution - SIZE) % 2):
        raise ValueError(f"--resolution {resolution} with --pad: needs 28 + an even number "
                         f"(e.g. 32); use --resize for other sizes")
    resample_filter(resample)
    if split is not None and split not in FILES:
        raise ValueError(f"--split {split!r}: fashion-mnist has splits {', '.join(FILES)}")
    splits = []
    for name in FILES if split is None else (split,):
        images, labels = read_split(src, name)
        splits.append(Split(name, len(images),
                            samples(images, labels, name, resolution, fit, resample)))
    options = {"fit": fit}
    if fit == "resize":
        options["resample"] = resample
    return Dataset("fashion-mnist", resolution, 1, 10, splits, options)
