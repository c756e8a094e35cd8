"""What the benchmark scripts (tools/benchmark*.py) share: the name of the device measured and a
stand-in image folder of real photographic content.

    device_name("cuda")                               # "NVIDIA H200"; "cpu": the CPU's model name
    photo_folder(Path(tmp) / "photos", 1000, 160)     # 1000 PNG crops, 160 x 160, from seed 0
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np


def device_name(device: str) -> str:
    """The GPU's name for "cuda", else the CPU's model name (/proc/cpuinfo, else platform)."""
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def photo_folder(folder: Path, count: int, size: int) -> Path:
    """`count` random size x size crops (seed 0) of scikit-learn's two sample photos as PNG files in
    a new `folder`: an image folder whose PNG sizes are those of real photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        photo = photos[i % len(photos)]
        y = rng.integers(0, photo.shape[0] - size)
        x = rng.integers(0, photo.shape[1] - size)
        Image.fromarray(photo[y: y + size, x: x + size]).save(folder / f"{i:05d}.png")
    return folder
