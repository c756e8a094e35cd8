"""Decode throughput of the shard reader: images/s for one in-process reader (one core) and with
DataLoader workers, at 32 and 128 px, from the local folder (memory map) and over HTTP (the same
folder served by `python -m http.server` in a separate process on 127.0.0.1). Prints one JSON
object; `*_per_core` divides by the reader processes (1, or --workers).

    python tools/benchmark_data.py [--images 4000] [--batch-size 100] [--workers 2] [--no-http]

Shards are built in a temp folder: 32 px from FashionMNIST when its IDX files are installed
(else scikit-learn's digits), 128 px from random crops of scikit-learn's two sample photos (real
photographic content, so PNG sizes are realistic). "foreign" rows: the same 1000 photos as
160 px JPEGs (quality 90) in shards written by webdataset's ShardWriter without meta.json, read at
128 px (resize + centre crop at load time) and at 32 px; `count_s_per_1000` is the time to count
the samples of such a folder (what replaces meta.json's counts), per 1000 samples.
`*_verified_vs_unverified`: the reader with and without the sha256 check of each shard against
meta.json (data.verify_shards), one core.
"""

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bidvl.benchmarking import photo_folder
from bidvl.data import build_shards, split_info, train_stream
from bidvl.data.fashion_mnist import DEFAULT_SRC as FASHION_SRC


def throughput(folder: Path, batch_size: int, workers: int, images: int, **fit) -> float:
    stream = train_stream(folder, "train", batch_size, seed=0, num_workers=workers, **fit)
    it = iter(stream)
    next(it)  # start-up (workers, first shard, shuffle buffer) is not throughput
    batches = max(1, images // batch_size)
    t0 = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - t0)


def foreign_folder(folder: Path, photos: Path) -> Path:
    """The photos as 160 px JPEGs in WebDataset shards of 100, written by webdataset's ShardWriter."""
    import io

    import webdataset as wds
    from PIL import Image

    folder.mkdir()
    with wds.ShardWriter(str(folder / "%06d.tar"), maxcount=100, verbose=0) as sink:
        for i, path in enumerate(sorted(photos.glob("*.png"))):
            buf = io.BytesIO()
            Image.open(path).save(buf, format="JPEG", quality=90)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "cls": i % 10})
    return folder


def jpeg_draft_rows(count: int = 200, size: int = 256) -> dict:
    """ms per image fitting `count` size x size photo JPEGs (quality 90) to 32/64/128 px, RGB, with
    the reduced-scale JPEG decode (`draft`, what the reader does) and without it (a full decode),
    and the mean absolute pixel difference between the two."""
    import io

    import numpy as np
    from PIL import Image, JpegImagePlugin
    from sklearn.datasets import load_sample_images

    from bidvl.data.reader import SampleDecoder

    photo = load_sample_images().images[0]
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        y, x = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        buf = io.BytesIO()
        Image.fromarray(photo[y: y + size, x: x + size]).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    rows, draft = {}, JpegImagePlugin.JpegImageFile.draft
    for res in (32, 64, 128):
        decoder = SampleDecoder(res, 3, fit=True)
        timed = {}
        for label in ("full", "draft", "full", "draft"):  # the second pair is the one kept (warm)
            JpegImagePlugin.JpegImageFile.draft = draft if label == "draft" else (lambda self, *a, **k: None)
            try:
                t0 = time.perf_counter()
                out = [decoder({"__key__": "k", "jpg": b})[0] for b in blobs]
                timed[label] = ((time.perf_counter() - t0) / count * 1e3, out)
            finally:
                JpegImagePlugin.JpegImageFile.draft = draft
        diff = float(np.mean([np.abs(a.astype(int) - b.astype(int)).mean()
                              for a, b in zip(timed["full"][1], timed["draft"][1])]))
        rows[f"jpeg{size}_to_{res}px_ms_full_decode"] = round(timed["full"][0], 3)
        rows[f"jpeg{size}_to_{res}px_ms_draft"] = round(timed["draft"][0], 3)
        rows[f"jpeg{size}_to_{res}px_draft_speedup"] = round(timed["full"][0] / timed["draft"][0], 2)
        rows[f"jpeg{size}_to_{res}px_mean_abs_diff_of_255"] = round(diff, 2)
    return rows


def serve(folder: Path) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` over `folder` on a free port; (process, base URL) once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/", timeout=1).close()
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"http.server on port {port} did not start")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=4000, help="images timed per measurement")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-http", action="store_true", help="local folder only")
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
        results.update(jpeg_draft_rows())
        foreign = foreign_folder(tmp / "foreign", photos)
        t0 = time.perf_counter()
        count = split_info(foreign, "train", resolution=128, channels=3)[0]["splits"]["train"]["count"]
        results["foreign_count_s_per_1000"] = round((time.perf_counter() - t0) / count * 1000, 4)
        for res in (128, 32):
            n = max(args.batch_size, args.images // 4)
            for label, workers in (("1_core", 0), (f"{args.workers}_workers", args.workers)):
                results[f"{res}px_foreign_jpeg_images_per_s_{label}"] = round(
                    throughput(foreign, args.batch_size, workers, n, resolution=res, channels=3))
        server, base = (None, None) if args.no_http else serve(tmp)
        try:
            for res in (32, 128):
                n = args.images if res == 32 else max(args.batch_size, args.images // 4)
                sources = {"local": tmp / f"s{res}"}
                if base:
                    sources["http"] = f"{base}/s{res}"
                best = {False: 0.0, True: 0.0}  # the sha256 check of each shard as it is read: its cost,
                for _ in range(3):  # interleaved, best of three (other jobs share the cores)
                    for verify in (False, True):
                        best[verify] = max(best[verify], throughput(tmp / f"s{res}", args.batch_size, 0, n, verify=verify))
                for verify in (False, True):
                    results[f"{res}px_local_images_per_s_1_core_{'verified' if verify else 'unverified'}"] = round(best[verify])
                results[f"{res}px_local_verified_vs_unverified_1_core"] = round(
                    results[f"{res}px_local_images_per_s_1_core_verified"]
                    / results[f"{res}px_local_images_per_s_1_core_unverified"], 3)
                for name, source in sources.items():
                    one = throughput(source, args.batch_size, 0, n)
                    many = throughput(source, args.batch_size, args.workers, n)
                    results[f"{res}px_{name}_images_per_s_1_core"] = round(one)
                    results[f"{res}px_{name}_images_per_s_{args.workers}_workers"] = round(many)
                    results[f"{res}px_{name}_images_per_s_per_core_{args.workers}_workers"] = round(
                        many / args.workers)
                if base:
                    for label in ("1_core", f"{args.workers}_workers"):
                        results[f"{res}px_http_vs_local_{label}"] = round(
                            results[f"{res}px_http_images_per_s_{label}"]
                            / results[f"{res}px_local_images_per_s_{label}"], 2)
        finally:
            if server is not None:
                server.kill()
                server.wait()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
