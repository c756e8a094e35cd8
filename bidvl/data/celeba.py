"""CelebA aligned faces (Liu et al. 2015): 178x218 JPEGs, no classes.

Expected in `src` (a folder; files may also sit in the official `Img/` and `Eval/` subfolders):

    img_align_celeba/000001.jpg ...   or   img_align_celeba.zip (members img_align_celeba/*.jpg)
    list_eval_partition.txt           lines "000001.jpg 0": 0 = train, 1 = valid, 2 = test

Each image is center-cropped to `crop` x `crop` (160 as the authors' code, offsets as torchvision's
CenterCrop: 9 px from the left, 29 px from the top of a 178x218 image) and resized to `resolution`
(32, 64 or 128 in the paper; default 64) with PIL bicubic (antialiased when shrinking). RGB.
Splits: `train` (162770), `valid` (19867), `test` (19962), in partition-file order; keys are the
file stems (`000001`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .meta import ShardError
from .writer import (Dataset, Split, center_crop, check_resolution, decode_image,
                     resample_filter)

SPLITS = {"train": 0, "valid": 1, "test": 2}
FOLDER = "img_align_celeba"
PARTITION = "list_eval_partition.txt"


def find_file(src: Path, name: str, subfolder: str) -> Path | None:
    """`src/name` or `src/subfolder/name`, whichever exists."""
    for candidate in (src / name, src / subfolder / name):
        if candidate.exists():
            return candidate
    return None


def read_partition(path: Path) -> dict[str, list[str]]:
    """File names per split from list_eval_partition.txt, in file order."""
    names: dict[str, list[str]] = {split: [] for split in SPLITS}
    by_id = {v: k for k, v in SPLITS.items()}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in ("0", "1", "2") or not parts[0].endswith(".jpg"):
            raise ShardError(f"{path}:{number}: {line!r}, expected 'NNNNNN.jpg 0|1|2'")
        names[by_id[int(parts[1])]].append(parts[0])
    return names


def image_reader(src: Path):
    """(function file name -> image bytes or None, where they are read from), from
    img_align_celeba/ or img_align_celeba.zip."""
    folder = find_file(src, FOLDER, "Img")
    if folder is not None and folder.is_dir():

        def read_file(name: str) -> bytes | None:
            path = folder / name
            return path.read_bytes() if path.is_file() else None

        return read_file, folder
    archive_path = find_file(src, f"{FOLDER}.zip", "Img")
    if archive_path is None:
        raise FileNotFoundError(f"--src {src}: neither {FOLDER}/ nor {FOLDER}.zip found "
                                f"(also looked in {src / 'Img'})")
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ShardError(f"{archive_path}: not a readable zip file ({exc})") from None
    members = set(archive.namelist())

    def read(name: str) -> bytes | None:
        member = f"{FOLDER}/{name}"
        return archive.read(member) if member in members else None

    return read, archive_path


def samples(read, where: Path, names: list[str], crop: int, resolution: int, resample: str):
    """Yields (stem, cropped and resized RGB image, None) for each file name."""
    pil_filter = resample_filter(resample)
    for name in names:
        data = read(name)
        if data is None:
            raise ShardError(f"{where}: {name} is missing (listed in {PARTITION})")
        image = decode_image(data, f"{where}/{name}").convert("RGB")
        image = center_crop(image, crop, f"{where}/{name}")
        yield Path(name).stem, image.resize((resolution, resolution), pil_filter), None


def load(src=None, resolution: int = 64, split: str | None = None, crop: int = 160,
         resample: str = "bicubic") -> Dataset:
    """CelebA as a `Dataset` (see the module docstring for the files expected in `src`)."""
    if src is None:
        raise ValueError("celeba needs --src: a folder with img_align_celeba/ (or "
                         "img_align_celeba.zip) and list_eval_partition.txt")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder")
    check_resolution(crop)
    check_resolution(resolution, high=crop)
    resample_filter(resample)
    if split is not None and split not in SPLITS:
        raise ValueError(f"--split {split!r}: celeba has splits {', '.join(SPLITS)}")
    partition = find_file(src, PARTITION, "Eval")
    if partition is None:
        raise FileNotFoundError(f"--src {src}: {PARTITION} not found (also looked in "
                                f"{src / 'Eval'})")
    names = read_partition(partition)
    read, where = image_reader(src)
    splits = []
    for name in SPLITS if split is None else (split,):
        if not names[name]:
            raise ShardError(f"{partition}: no images in split {name!r}")
        splits.append(Split(name, len(names[name]),
                            samples(read, where, names[name], crop, resolution, resample)))
    options = {"crop": crop, "resample": resample}
    return Dataset("celeba", resolution, 3, None, splits, options)
