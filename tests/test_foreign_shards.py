"""Shards written by other tools (no meta.json): webdataset's own ShardWriter, JPEG/PNG/WebP of
any size and mode with .cls/.json beside them, read at data.resolution/data.channels with
resize + crop (+ flip), in the exact order, resumable, with the strict reader's errors."""

import io
import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from conftest import ENV, REPO, TINY, train_tiny, weights
from bidvl.data import ShardError, eval_stream, split_info, train_stream
from bidvl.data.meta import FOREIGN
from bidvl.data.reader import SampleDecoder

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"))


def write_foreign(folder, count=60, pattern="shard-%06d.tar", maxcount=13, seed=0):
    """Real digits, upscaled to random sizes (20-48 px a side, not square), RGB or grey, as JPEG,
    PNG or WebP, with .cls and .json, written by webdataset's ShardWriter. Returns the PIL images."""
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = []
    with wds.ShardWriter(str(folder / pattern), maxcount=maxcount, verbose=0) as sink:
        for i in range(count):
            w, h = (int(x) for x in rng.integers(20, 49, 2))
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            im = Image.fromarray(pixels).resize((w, h), Image.Resampling.NEAREST)
            if i % 3:
                im = im.convert("RGB")
            ext, fmt = FORMATS[i % 3]
            buf = io.BytesIO()
            im.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            images.append(Image.open(io.BytesIO(buf.getvalue())))
            sink.write({"__key__": f"sample{i:05d}", ext: buf.getvalue(), "cls": int(digits.target[i]),
                        "json": {"index": i, "source": "sklearn digits"}})
    return images


def sums(source, n=10, **kwargs):
    kwargs = {"batch_size": 8, "seed": 3, "resolution": 16, "channels": 3, **kwargs}
    return [b[0].sum(dim=(1, 2, 3)).tolist() for b in itertools.islice(iter(train_stream(source, "train", **kwargs)), n)]


def test_a_shardwriter_folder_is_read_without_meta_json(tmp_path):
    folder = tmp_path / "foreign"
    write_foreign(folder)
    meta, shards, counts = split_info(folder, "train", resolution=16, channels=3)
    assert meta["format"] == FOREIGN and meta["resolution"] == 16 and meta["channels"] == 3
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(5)]  # every tar, sorted
    assert counts == [13, 13, 13, 13, 8] and meta["splits"]["train"]["count"] == 60
    images, labels = next(iter(eval_stream(folder, "train", 60, resolution=16, channels=1)))[:2]
    assert images.shape == (60, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert labels.tolist() == load_digits().target[:60].tolist()  # .cls read, in file order
    with pytest.raises(ShardError, match=rf"{folder}: no shards of split 'test' \(no meta.json; its 5 tar "
                                         r"files are split 'train'; name held-out shards test-\*.tar"):
        split_info(folder, "test", resolution=16, channels=3)
    with pytest.raises(ShardError, match=r"read at data.resolution and data.channels"):
        split_info(folder, "train")


def test_splits_by_name_prefix_or_subfolder(tmp_path):
    write_foreign(tmp_path / "named", 30, "train-%06d.tar", 10)
    write_foreign(tmp_path / "named", 12, "test-%06d.tar", 10, seed=1)
    assert split_info(tmp_path / "named", "train", resolution=16, channels=1)[2] == [10, 10, 10]
    assert split_info(tmp_path / "named", "test", resolution=16, channels=1)[2] == [10, 2]
    write_foreign(tmp_path / "sub" / "train", 20, maxcount=10)
    write_foreign(tmp_path / "sub" / "val", 5)
    assert split_info(tmp_path / "sub", "val", resolution=16, channels=1)[2] == [5]
    assert split_info(tmp_path / "sub", "train", resolution=16, channels=1)[2] == [10, 10]
    # An explicit list of shards without meta.json beside them: counted from the shards too.
    meta, _, counts = split_info(f"{tmp_path}/named/train-{{000000..000001}}.tar", "train", resolution=16,
                                 channels=1)
    assert meta["format"] == FOREIGN and counts == [10, 10]


def test_images_are_fitted_like_resize_then_center_crop():
    """Shorter side to the resolution (bicubic), the longer one scaled and truncated, a centred
    square crop (torchvision's Resize(int) + CenterCrop rule); modes converted."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 47, 4), dtype=np.uint8), "RGBA")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    got, _ = SampleDecoder(16, 3, fit=True)({"__key__": "k", "png": buf.getvalue()})
    expected = im.convert("RGB").resize((25, 16), Image.Resampling.BICUBIC).crop((4, 0, 20, 16))
    assert got.shape == (3, 16, 16) and np.array_equal(got, np.asarray(expected).transpose(2, 0, 1))
    grey, _ = SampleDecoder(16, 1, fit=True)({"__key__": "k", "png": buf.getvalue()})
    assert np.array_equal(grey[0], np.asarray(im.convert("L").resize((25, 16), Image.Resampling.BICUBIC)
                                              .crop((4, 0, 20, 16))))
    # Random crops and flips follow the rng given (training); without one: centred, never flipped.
    random_crop = SampleDecoder(16, 3, fit=True, crop="random", flip=True)
    seen = {random_crop({"__key__": "k", "png": buf.getvalue()}, __import__("random").Random(s))[0].tobytes()
            for s in range(40)}
    assert len(seen) > 10  # 10 crop positions x 2 flips
    assert np.array_equal(random_crop({"__key__": "k", "png": buf.getvalue()})[0], got)
    # bidvl's own shards stay strict: a wrong size is an error, not resized.
    with pytest.raises(ShardError, match=r"image is 47x30, expected 16x16 \(meta.json resolution\)"):
        SampleDecoder(16, 3)({"__key__": "k", "png": buf.getvalue()})


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.process
def test_the_order_with_crops_and_flips_is_exact_on_resume(tmp_path, workers):
    folder = tmp_path / "foreign"
    write_foreign(folder)
    kwargs = {"num_workers": workers, "crop": "random", "flip": True, "rank": 1, "world_size": 2}
    whole = sums(folder, 10, **kwargs)
    assert whole == sums(folder, 10, **kwargs)  # a pure function of (seed, rank, batch)
    assert sums(folder, 4, start_batch=6, **kwargs) == whole[6:]
    assert whole != sums(folder, 10, **{**kwargs, "flip": False})  # the flips do something
    assert sums(folder, 10, **{**kwargs, "seed": 4}) != whole


def test_bad_members_and_images_are_named_and_skippable(tmp_path, capfd):
    folder = tmp_path / "foreign"
    write_foreign(folder, 20, maxcount=10)
    with wds.TarWriter(str(folder / "shard-000002.tar")) as sink:
        sink.write({"__key__": "evil", "pyd": b"\x80\x04K\x01."})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8\xff\xe0 not a jpeg"})
        sink.write({"__key__": "caption", "png": np.zeros(1, np.uint8).tobytes(), "txt": b"a caption"})
    with pytest.raises(ShardError, match=r"shard .*shard-000002.tar, sample evil: member .pyd is not allowed"):
        list(eval_stream(folder, "train", 4, resolution=16, channels=1))
    batches = sums(folder, 6, on_error="skip", channels=1, batch_size=4)
    assert len(batches) == 6
    err = capfd.readouterr().err
    assert "sample evil: member .pyd is not allowed" in err and "sample broken: member .jpg is not a readable image" in err
    assert "sample caption: member .png is not a readable image" in err  # .txt allowed, the image is not


@pytest.mark.process
def test_a_remote_list_without_meta_json_is_counted_once_it_says_so(tmp_path, capfd):
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "foreign"
    write_foreign(folder, 30, maxcount=10)
    handler = partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/shard-{{000000..000002}}.tar"
        meta, _, counts = split_info(url, "train", resolution=16, channels=3)
        assert meta["format"] == FOREIGN and counts == [10, 10, 10]
        assert "counting the samples of 3 shards" in capfd.readouterr().err
        assert sums(url, 6, num_workers=1) == sums(folder, 6, num_workers=1)
        with pytest.raises(ShardError, match=r"no meta.json\); shards written by another tool are read from a "
                                             r"list of them, e.g. http://127.0.0.1:\d+/{000000..000099}.tar"):
            split_info(f"http://127.0.0.1:{server.server_port}", "train", resolution=16, channels=3)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.process
def test_the_same_tars_without_meta_json_train_to_the_same_weights(tmp_path, digits16):
    """bidvl's own shards with their meta.json removed are a WebDataset like any other: the run
    reads them in the same order and gives bit-identical weights (16 px grey images need no fit)."""
    foreign = tmp_path / "no_meta"
    shutil.copytree(digits16, foreign, ignore=shutil.ignore_patterns("meta.json", "fid_stats"))
    runs = {name: train_tiny(tmp_path / name, source, "train.max_steps=4", "health.every=2")
            for name, source in (("own", digits16), ("foreign", foreign))}
    a, b = weights(runs["own"]), weights(runs["foreign"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    health = [json.loads(x) for x in (runs["foreign"] / "health.jsonl").read_text().splitlines()]
    assert [h["step"] for h in health] == [2, 4]  # the held-out test-*.tar shards probe the run


@pytest.mark.slow
def test_a_shardwriter_folder_trains_and_evaluates_from_the_command_line(tmp_path):
    """`bidvl train` on JPEG/PNG/WebP shards of any size (RGB and grey) at data.channels=3 with
    random crops and flips, two loader workers; then `bidvl evaluate` (rmse, ood) on them."""
    folder = tmp_path / "foreign"
    write_foreign(folder, 120, "train-%06d.tar", 30)
    write_foreign(folder, 40, "test-%06d.tar", 20, seed=1)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bidvl", "train", *TINY, f"run.dir={run}", f"data.train={folder}",
                           "data.channels=3", "data.crop=random", "data.flip=true", "data.num_workers=2",
                           "train.max_steps=4", "health.every=2"],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "model" / "energy.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "bidvl", "evaluate", "--run", str(run), "--metrics", "rmse,ood",
                           "--ood", str(folder)], env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert report["rmse"]["data"]["count"] == 40 and set(report["ood"]["auroc"]) == {"uniform", "foreign"}
