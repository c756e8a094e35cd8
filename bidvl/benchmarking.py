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


# The Tensor methods that copy a value to the host: on a GPU each one waits for every kernel queued
# before it (and a CUDA graph cannot capture it). `numpy` is left out on purpose: it refuses a CUDA
# tensor, so it only ever reads host memory (bidvl.distributed.HostFlags reads with it).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")


class DeviceReads:
    """Counts the calls of Tensor's reading methods (READS) while active; `sites` maps each
    "file:line" (first frame inside bidvl) to its count. On the CPU every tensor is in host memory,
    so this counts what would be a device read on a GPU:

        with DeviceReads() as reads:
            trainer.fit()
        reads.count, reads.sites
    """

    def __init__(self):
        self.count = 0
        self.sites: dict[str, int] = {}
        self._saved: dict = {}

    def _site(self) -> str:
        import traceback

        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/bidvl/" in frame.filename and not frame.filename.endswith("benchmarking.py"):
                return f"{Path(frame.filename).name}:{frame.lineno}"
        return "outside bidvl"

    def __enter__(self):
        import torch

        for name in READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def reading(tensor, *args, _original=original, **kwargs):
                self.count += 1
                site = self._site()
                self.sites[site] = self.sites.get(site, 0) + 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, reading)
        return self

    def __exit__(self, *exc):
        import torch

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return False
