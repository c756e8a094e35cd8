"""scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled with scikit-learn.

No download: `sklearn.datasets.load_digits()` reads a file shipped inside the package. Pixel values
0..16 are scaled to 0..255 (`round(v * 255 / 16)`) and the 8x8 image is resized to the output
resolution (16 or 32) with PIL (bicubic by default), one channel, white digit on black.

Split (fixed, no randomness): the first 1437 images are `train`, the last 360 are `test` (80/20;
the bundled order cycles through the classes, so both splits hold every class in near-equal
numbers).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .writer import Dataset, Split, index_key, resample_filter

SPLITS = ("train", "test")
NUM_TRAIN = 1437
RESOLUTIONS = (16, 32)


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 8 x 8 in 0..255, labels int N) in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_range(split: str) -> slice:
    return slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)


def samples(images: np.ndarray, labels: np.ndarray, split: str, resolution: int, resample: str):
    """Yields (key, image, cls) for one split, resized to `resolution`."""
    pil_filter = resample_filter(resample)
    for index, (image, label) in enumerate(zip(images, labels)):
        resized = Image.fromarray(image).resize((resolution, resolution), pil_filter)
        yield index_key(split, index), resized, int(label)


def load(src=None, resolution: int = 32, split: str | None = None, resample: str = "bicubic"
         ) -> Dataset:
    """The digits dataset as a `Dataset`; `src` must be None (the data ships with scikit-learn)."""
    if src is not None:
        raise ValueError("digits ships with scikit-learn: do not pass --src")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"--resolution {resolution}: digits supports {RESOLUTIONS}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split {split!r}: digits has splits {', '.join(SPLITS)}")
    resample_filter(resample)
    images, labels = load_arrays()
    splits = []
    for name in SPLITS if split is None else (split,):
        part = split_range(name)
        x, y = images[part], labels[part]
        splits.append(Split(name, len(x), samples(x, y, name, resolution, resample)))
    options = {"resample": resample, "split_rule": f"first {NUM_TRAIN} train, rest test"}
    return Dataset("digits", resolution, 1, 10, splits, options)
