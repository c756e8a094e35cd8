"""The shard writers and `launch/make_shards.py`: formats in, shards out, clear errors, atomicity.

Shards are read back here with `tarfile` + PIL (not the reader), so the writers are tested on
their own. Fixtures for CIFAR-10, SVHN, CelebA and image folders are tiny files in the real
formats, built by the tests.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bidvl.data.build import build_shards
from bidvl.data.meta import ShardError
from bidvl.data.writer import Dataset, Split, shard_sizes, write_dataset

ROOT = Path(__file__).resolve().parents[1]
MAKE_SHARDS = ROOT / "launch" / "make_shards.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")


# --- helpers -------------------------------------------------------------------------------------


def read_shards(folder: Path) -> dict:
    """{split: [(key, pixels, mode, cls or None)]} in shard order, checking meta.json counts."""
    meta = json.loads((folder / "meta.json").read_text())
    out = {}
    for split, info in meta["splits"].items():
        samples = []
        for shard in info["shards"]:
            with tarfile.open(folder / shard["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            keys = sorted({name.split(".")[0] for name in members})
            assert len(keys) == shard["count"]
            for key in keys:
                image = Image.open(io.BytesIO(members[f"{key}.png"]))
                cls = members.get(f"{key}.cls")
                samples.append((key, np.array(image), image.mode,
                                None if cls is None else int(cls.decode("ascii"))))
        assert len(samples) == info["count"]
        out[split] = samples
    return out


def file_hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir())}


def run_cli(*args) -> subprocess.CompletedProcess:
    """Runs make_shards.py in a fresh interpreter (a user's view: exit code and stderr)."""
    return subprocess.run([sys.executable, str(MAKE_SHARDS), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def load_cli():
    spec = importlib.util.spec_from_file_location("make_shards", MAKE_SHARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """Runs make_shards.main in this process (faster); returns (exit code, stderr)."""
    code = load_cli().main([str(a) for a in args])
    return code, capsys.readouterr().err


def random_images(n, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# --- fixtures in the real source formats ---------------------------------------------------------


def write_cifar_folder(parent: Path, per_batch=3, test=4) -> tuple[Path, dict]:
    """A cifar-10-batches-py folder of pickled dict batches; returns it and the expected data."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {"train": ([], []), "test": ([], [])}
    names = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
    for seed, (name, split, n) in enumerate(names + [("test_batch", "test", test)]):
        rng = np.random.default_rng(seed)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        expected[split][0].extend(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        expected[split][1].extend(labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}, protocol=2))
    return folder, expected


def write_svhn_folder(folder: Path, counts={"train": 5, "test": 3, "extra": 2}) -> dict:
    """train/test/extra_32x32.mat with X (32, 32, 3, N) uint8 and y (N, 1) in 1..10."""
    from scipy.io import savemat

    folder.mkdir(parents=True)
    expected = {}
    for seed, (split, n) in enumerate(counts.items()):
        x = random_images(n, (32, 32, 3), seed).transpose(1, 2, 3, 0)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # includes 10 when n > 9
        y[0] = 10
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        expected[split] = (x.transpose(3, 0, 1, 2), y.reshape(-1) % 10)
    return expected


def write_celeba_folder(folder: Path, partition=(0, 0, 0, 1, 2, 0)) -> list[Path]:
    """img_align_celeba/ of 178x218 JPEGs and list_eval_partition.txt."""
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    lines, paths = [], []
    for i, part in enumerate(partition, start=1):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:06d}.jpg", quality=90)
        lines.append(f"{i:06d}.jpg {part}")
        paths.append(images / f"{i:06d}.jpg")
    (folder / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return paths


def zip_celeba(folder: Path, target: Path) -> None:
    """The official layout: img_align_celeba.zip with members img_align_celeba/NNNNNN.jpg."""
    target.mkdir(parents=True)
    with zipfile.ZipFile(target / "img_align_celeba.zip", "w") as archive:
        for path in sorted((folder / "img_align_celeba").iterdir()):
            archive.write(path, f"img_align_celeba/{path.name}")
    (target / "list_eval_partition.txt").write_bytes(
        (folder / "list_eval_partition.txt").read_bytes())


def write_image_folder(folder: Path) -> dict:
    """Class subfolders with png/jpg/JPG/webp/bmp, non-square sizes; returns {relpath: class}."""
    files = {
        "cat/a.png": (40, 30), "cat/b.JPG": (30, 50), "cat/deeper/c.webp": (64, 64),
        "dog/d.bmp": (20, 20), "dog/e.jpeg": (50, 40), "dog/f.png": (33, 31),
    }
    for i, (name, (w, h)) in enumerate(files.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = random_images(1, (h, w, 3), i)[0]
        Image.fromarray(pixels).save(path, quality=95)  # quality: only JPEG and WebP use it
    (folder / "dog" / "notes.txt").write_text("not an image")
    return {name: 0 if name.startswith("cat") else 1 for name in files}


# --- the writer itself ---------------------------------------------------------------------------


def test_shard_sizes_are_contiguous_and_even():
    assert shard_sizes(10) == [1] * 10  # fewer samples than 64: one per shard
    assert shard_sizes(130) == [3, 3] + [2] * 62
    assert sum(shard_sizes(60000)) == 60000 and len(shard_sizes(60000)) == 64
    assert max(shard_sizes(1437)) - min(shard_sizes(1437)) == 1


def test_writer_tar_members_are_fixed(tmp_path):
    dataset = Dataset("test", 8, 3, 2, [Split("train", 2, [
        ("a", np.zeros((8, 8, 3), np.uint8), 1), ("b", Image.new("RGB", (8, 8)), None)])])
    write_dataset(tmp_path / "out", dataset)
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["a.png", "a.cls"]
    for m in members:
        assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) == (0, 0o644, 0, 0, "", "")
    assert not list((tmp_path / "out").glob(".*"))  # no temp files left


def test_writer_rejects_bad_samples(tmp_path):
    def dataset(samples, count=None):
        return Dataset("test", 8, 1, None, [Split("train", count or len(samples), samples)])

    gray = np.zeros((8, 8), np.uint8)
    with pytest.raises(ShardError, match=r"sample 'a'.*expected uint8 \(8, 8\)"):
        write_dataset(tmp_path / "1", dataset([("a", np.zeros((9, 8), np.uint8), None)]))
    with pytest.raises(ShardError, match="keys must be unique and sorted"):
        write_dataset(tmp_path / "2", dataset([("b", gray, None), ("a", gray, None)]))
    with pytest.raises(ShardError, match="only letters, digits"):
        write_dataset(tmp_path / "3", dataset([("a.b", gray, None)]))
    with pytest.raises(ShardError, match="ended after 1 samples, expected 2"):
        write_dataset(tmp_path / "4", dataset([("a", gray, None)], count=2))


# --- digits and Fashion-MNIST: real data, round trip ---------------------------------------------


def test_digits_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    meta = build_shards("digits", tmp_path / "digits")
    assert meta["resolution"] == 32 and meta["channels"] == 1 and meta["num_classes"] == 10
    assert meta["options"]["src"] is None and meta["options"]["resample"] == "bicubic"
    shards = read_shards(tmp_path / "digits")
    assert [len(shards["train"]), len(shards["test"])] == [1437, 360]
    assert len(meta["splits"]["train"]["shards"]) == 64
    target = load_digits().target
    labels = [cls for split in ("train", "test") for _, _, _, cls in shards[split]]
    assert labels == target.tolist()
    key, pixels, mode, _ = shards["train"][0]
    assert key == "train_0000000" and mode == "L" and pixels.shape == (32, 32)
    assert pixels.max() > 200 and pixels.min() == 0  # a white digit on black


def test_digits_build_is_byte_identical(tmp_path):
    build_shards("digits", tmp_path / "a", resolution=16)
    build_shards("digits", tmp_path / "b", resolution=16)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")


def read_idx_labels(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"Fashion-MNIST not installed at {FASHION}")
def test_fashion_mnist_round_trip(tmp_path):
    # The full test split (10000; about 5 s), and the first 600 of train via --limit (the full
    # 60000 take about 30 s, measured on 2 CPU cores).
    build_shards("fashion-mnist", tmp_path / "test", split="test")
    test = read_shards(tmp_path / "test")["test"]
    assert len(test) == 10000
    labels = read_idx_labels(FASHION / "t10k-labels-idx1-ubyte.gz")
    assert [cls for *_, cls in test] == labels.tolist()
    with gzip.open(FASHION / "t10k-images-idx3-ubyte.gz") as f:
        first = np.frombuffer(f.read(), np.uint8, offset=16)[:784].reshape(28, 28)
    _, pixels, mode, _ = test[0]
    assert mode == "L" and pixels.shape == (32, 32)
    assert np.array_equal(pixels[2:30, 2:30], first) and pixels[:2].max() == 0  # 2 px padding

    meta = build_shards("fashion-mnist", tmp_path / "train", split="train", limit=600)
    assert meta["options"]["limit"] == 600 and meta["options"]["fit"] == "pad"
    train = read_shards(tmp_path / "train")["train"]
    labels = read_idx_labels(FASHION / "train-labels-idx1-ubyte.gz")[:600]
    assert [cls for *_, cls in train] == labels.tolist()

    build_shards("fashion-mnist", tmp_path / "resized", split="test", fit="resize", limit=5)
    assert read_shards(tmp_path / "resized")["test"][0][1].shape == (32, 32)


def test_fashion_mnist_bad_files(tmp_path, capsys):
    src = tmp_path / "fm"
    src.mkdir()
    with gzip.open(src / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(np.array([2049, 1, 28, 28], ">i4").tobytes() + bytes(784))  # labels magic
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, 1], ">i4").tobytes() + bytes(1))
    code, err = cli_in_process(capsys, "fashion-mnist", "--src", src, "--split", "test",
                               "--out", tmp_path / "out")
    assert code == 2 and "t10k-images-idx3-ubyte.gz: IDX magic 2049, expected 2051" in err
    code, err = cli_in_process(capsys, "fashion-mnist", "--src", src, "--out", tmp_path / "out")
    assert code == 2 and "train-images-idx3-ubyte.gz is missing" in err


# --- CIFAR-10 and SVHN on fixtures ---------------------------------------------------------------


def test_cifar10_folder_and_tar_gz(tmp_path):
    folder, expected = write_cifar_folder(tmp_path / "src")
    meta = build_shards("cifar10", tmp_path / "a", src=folder)
    assert meta["channels"] == 3 and meta["splits"]["train"]["count"] == 15
    shards = read_shards(tmp_path / "a")
    for split in ("train", "test"):
        images, labels = expected[split]
        assert [cls for *_, cls in shards[split]] == labels
        assert all(mode == "RGB" for _, _, mode, _ in shards[split])
        assert np.array_equal(np.stack([p for _, p, _, _ in shards[split]]), np.stack(images))

    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    build_shards("cifar10", tmp_path / "b", src=archive)
    build_shards("cifar10", tmp_path / "c", src=tmp_path / "src")  # the folder that contains it
    hashes = [file_hashes(tmp_path / x) for x in "abc"]
    for h in hashes:
        h.pop("meta.json")  # records src as given
    assert hashes[0] == hashes[1] == hashes[2]


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder, _ = write_cifar_folder(tmp_path / "src")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ShardError, match=r"test_batch: not a CIFAR-10 python batch.*refusing"):
        build_shards("cifar10", tmp_path / "out", src=folder, split="test")


def test_svhn_round_trip_and_extra(tmp_path):
    expected = write_svhn_folder(tmp_path / "svhn")
    meta = build_shards("svhn", tmp_path / "out", src=tmp_path / "svhn")
    assert set(meta["splits"]) == {"train", "test"}  # extra only when asked
    shards = read_shards(tmp_path / "out")
    for split in ("train", "test"):
        images, labels = expected[split]
        assert [cls for *_, cls in shards[split]] == labels.tolist()
        assert shards[split][0][3] == 0  # label 10 is the digit 0
        assert np.array_equal(np.stack([p for _, p, _, _ in shards[split]]), images)
    # Adding extra to the same folder keeps train and test (same source and options).
    meta = build_shards("svhn", tmp_path / "out", src=tmp_path / "svhn", split="extra",
                        overwrite=True)
    assert set(meta["splits"]) == {"train", "test", "extra"}
    assert len(read_shards(tmp_path / "out")["extra"]) == 2


# --- CelebA and image folders on fixtures --------------------------------------------------------


def test_celeba_crop_resize_and_zip(tmp_path):
    paths = write_celeba_folder(tmp_path / "celeba")
    meta = build_shards("celeba", tmp_path / "a", src=tmp_path / "celeba", resolution=32)
    assert meta["num_classes"] is None
    assert meta["options"]["crop"] == 160 and meta["options"]["resample"] == "bicubic"
    shards = read_shards(tmp_path / "a")
    assert {k: len(v) for k, v in shards.items()} == {"train": 4, "valid": 1, "test": 1}
    key, pixels, mode, cls = shards["train"][0]
    assert (key, mode, cls, pixels.shape) == ("000001", "RGB", None, (32, 32, 3))
    expected = Image.open(paths[0]).crop((9, 29, 169, 189)).resize((32, 32), Image.BICUBIC)
    assert np.array_equal(pixels, np.array(expected))
    assert [k for k, *_ in shards["test"]] == ["000005"]

    zip_celeba(tmp_path / "celeba", tmp_path / "zipped")
    build_shards("celeba", tmp_path / "b", src=tmp_path / "zipped", resolution=32)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    a.pop("meta.json"), b.pop("meta.json")
    assert a == b


def test_imagefolder_classes_formats_and_channels(tmp_path):
    classes = write_image_folder(tmp_path / "images")
    meta = build_shards("imagefolder", tmp_path / "rgb", src=tmp_path / "images", resolution=16)
    assert meta["num_classes"] == 2 and meta["options"]["classes"] == ["cat", "dog"]
    train = read_shards(tmp_path / "rgb")["train"]
    assert [cls for *_, cls in train] == [classes[n] for n in sorted(classes)]
    assert all(p.shape == (16, 16, 3) and m == "RGB" for _, p, m, _ in train)

    build_shards("imagefolder", tmp_path / "grey", src=tmp_path / "images", resolution=16,
                 channels=1, split="all")
    grey = read_shards(tmp_path / "grey")["all"]
    assert all(p.shape == (16, 16) and m == "L" for _, p, m, _ in grey)
    assert grey[0][0] == "all_0000000"


def test_imagefolder_without_classes_and_holdout(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(40):
        Image.fromarray(random_images(1, (12, 12, 3), i)[0]).save(src / f"img{i:02d}.png")
    meta = build_shards("imagefolder", tmp_path / "a", src=src, resolution=8, holdout=0.25)
    assert meta["num_classes"] is None and meta["options"]["holdout"] == 0.25
    counts = {k: v["count"] for k, v in meta["splits"].items()}
    assert counts["train"] + counts["test"] == 40 and 0 < counts["test"] < 20
    assert all(cls is None for *_, cls in read_shards(tmp_path / "a")["test"])
    build_shards("imagefolder", tmp_path / "b", src=src, resolution=8, holdout=0.25)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")


# --- bad input: one clear line, exit code 2 ------------------------------------------------------


@pytest.mark.process
def test_cli_missing_src_wrong_format_and_help(tmp_path):
    result = run_cli("cifar10", "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cifar10 needs --src")

    not_cifar = tmp_path / "not_cifar"
    not_cifar.mkdir()
    (not_cifar / "readme.txt").write_text("hello")
    result = run_cli("cifar10", "--src", not_cifar, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a cifar-10-batches-py folder" in result.stderr and str(not_cifar) in result.stderr

    result = run_cli("--help")
    assert result.returncode == 0 and "fashion-mnist" in result.stdout


@pytest.mark.process
def test_cli_refuses_existing_shards_unless_overwrite(tmp_path, capsys):
    src = tmp_path / "images"
    write_image_folder(src)
    out = tmp_path / "out"
    assert cli_in_process(capsys, "imagefolder", "--src", src, "--out", out)[0] == 0
    before = file_hashes(out)
    result = run_cli("imagefolder", "--src", src, "--out", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"error: --out {out} already holds shards (meta.json); pass " \
                            f"--overwrite to replace them\n"
    assert file_hashes(out) == before
    assert cli_in_process(capsys, "imagefolder", "--src", src, "--out", out, "--overwrite")[0] == 0
    assert file_hashes(out) == before


def test_cli_corrupt_image_and_empty_folder(tmp_path, capsys):
    src = tmp_path / "images"
    write_image_folder(src)
    (src / "dog" / "z.jpg").write_bytes(b"this is not a jpeg")
    code, err = cli_in_process(capsys, "imagefolder", "--src", src, "--out", tmp_path / "out")
    assert code == 2 and f"{src / 'dog' / 'z.jpg'}: not a readable image" in err
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").iterdir())  # the partial shards were removed

    (tmp_path / "empty").mkdir()
    code, err = cli_in_process(capsys, "imagefolder", "--src", tmp_path / "empty",
                               "--out", tmp_path / "out2")
    assert code == 2 and "no images" in err and str(tmp_path / "empty") in err


def test_cli_celeba_image_smaller_than_crop(tmp_path, capsys):
    paths = write_celeba_folder(tmp_path / "celeba")
    Image.new("RGB", (100, 100)).save(paths[2])
    code, err = cli_in_process(capsys, "celeba", "--src", tmp_path / "celeba",
                               "--out", tmp_path / "out")
    assert code == 2
    assert "000003.jpg: image is 100x100, smaller than the 160x160 crop" in err


def test_cli_rejects_options_for_other_datasets(tmp_path, capsys):
    code, err = cli_in_process(capsys, "cifar10", "--src", tmp_path, "--crop", "100",
                               "--out", tmp_path / "out")
    assert code == 2 and "'crop' does not apply to cifar10" in err
    code, err = cli_in_process(capsys, "digits", "--src", tmp_path, "--out", tmp_path / "out")
    assert code == 2 and "do not pass --src" in err
    code, err = cli_in_process(capsys, "fashion-mnist", "--src", tmp_path, "--resolution", "31",
                               "--out", tmp_path / "out")
    assert code == 2 and "--resolution 31 with --pad" in err


# --- atomicity -----------------------------------------------------------------------------------


def test_failed_rebuild_leaves_old_shards_untouched(tmp_path):
    out = tmp_path / "out"
    gray = np.zeros((8, 8), np.uint8)
    good = Dataset("test", 8, 1, None, [Split("train", 100, [
        (f"k{i:03d}", gray + i, None) for i in range(100)])])
    write_dataset(out, good)
    before = file_hashes(out)

    def failing_source():
        for i in range(100):
            if i == 70:  # shards 0.. of the new build are complete by now
                raise RuntimeError("source broke midway")
            yield f"k{i:03d}", gray + 2 * i, None

    bad = Dataset("test", 8, 1, None, [Split("train", 100, failing_source())])
    with pytest.raises(RuntimeError, match="midway"):
        write_dataset(out, bad, overwrite=True)
    assert file_hashes(out) == before  # no temp files left either


def test_overwrite_removes_stale_shards(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (i, i, i)).save(src / f"{i}.png")
    build_shards("imagefolder", tmp_path / "out", src=src, resolution=8)
    assert len(list((tmp_path / "out").glob("train-*.tar"))) == 10
    for i in range(5, 10):
        (src / f"{i}.png").unlink()
    meta = build_shards("imagefolder", tmp_path / "out", src=src, resolution=8, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        s["name"] for s in meta["splits"]["train"]["shards"]]
    assert len(meta["splits"]["train"]["shards"]) == 5


BUILD_ONCE = """
import sys, time
from pathlib import Path
from bidvl.data.build import build_once
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
print("built" if build_once("digits", sys.argv[1], 16) else "found", flush=True)
"""


@pytest.mark.process
def test_build_once_from_processes_started_at_once(tmp_path):
    """launch/study.py starts its runs at once on a fresh clone, each auto-building the same
    folder: one process builds, the others wait on the lock and read its shards (before the
    lock, two writers shared the temp names and one died on the rename)."""
    folder, go = tmp_path / "digits16", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_ONCE, str(folder), str(go)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    import time

    time.sleep(4.0)  # past the imports, so the three reach build_once together
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert sorted(o.strip().splitlines()[-1] for o in outs) == ["built", "found", "found"], outs
    assert not list(folder.glob(".*.tmp*"))
    reference = tmp_path / "reference"
    build_shards("digits", out=reference, resolution=16)
    ours, theirs = (json.loads((f / "meta.json").read_text()) for f in (folder, reference))
    assert ours["splits"] == theirs["splits"]  # counts and every shard's sha256
    assert sum(len(records) for records in read_shards(folder).values()) == 1797
