"""Decode throughput of the shard reader: images/s for one in-process reader (one core) and with
DataLoader workers, at 32 and 128 px. Prints one JSON object.

    python launch/benchmark_data.py [--images 4000] [--batch-size 100] [--workers 2]

Shards are built in a temp folder: 32 px from FashionMNIST when its IDX files are installed
(else scikit-learn's digits), 128 px from random crops of scikit-learn's two sample photos (real
photographic content, so PNG sizes are realistic).
"""

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bidvl.benchmarking import photo_folder
from bidvl.data import build_shards, train_stream
from bidvl.data.fashion_mnist import DEFAULT_SRC as FASHION_SRC


def throughput(folder: Path, batch_size: int, workers: int, images: int) -> float:
    stream = train_stream(folder, "train", batch_size, seed=0, num_workers=workers)
    it = iter(stream)
    next(it)  # start-up (workers, first shard, shuffle buffer) is not throughput
    batches = max(1, images // batch_size)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images timed per measurement")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if Path(FASHION_SRC).is_dir():
            build_shards("fashion-mnist", out=str(tmp / "s32"), split="train", limit=8000)
            results["source_32px"] = "fashion-mnist (8000 train images)"
        else:
            build_shards("digits", out=str(tmp / "s32"), resolution=32)
            results["source_32px"] = "digits"
        photos = photo_folder(tmp / "photos", 1000, 160)
        build_shards("imagefolder", out=str(tmp / "s128"), src=str(photos), resolution=128)
        results["source_128px"] = "1000 crops of scikit-learn sample photos"
        for res in (32, 128):
            folder = tmp / f"s{res}"
            n = args.images if res == 32 else max(args.batch_size, args.images // 4)
            results[f"{res}px_images_per_s_1_core"] = round(throughput(folder, args.batch_size, 0, n))
            results[f"{res}px_images_per_s_{args.workers}_workers"] = round(
                throughput(folder, args.batch_size, args.workers, n))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
