"""Any folder tree of images (.png .jpg .jpeg .webp .bmp, any case), found recursively.

Classes: if `src` holds no image directly but has subfolders with images, each top-level
subfolder is a class (ids 0, 1, ... by sorted folder name; images deeper inside count for their
top-level folder), as torchvision's ImageFolder. Otherwise samples carry no class.

Each image is turned upright from its EXIF orientation, center-cropped to a square (its shorter
side), resized to `resolution` (default 32) with PIL bicubic, and converted to `channels` 1
(grey, PIL "L") or 3 (RGB; transparency is dropped). Files are taken in sorted order of their
path relative to `src`; keys are `<split>_<index>`.

Splits: every image goes to `split` (default `train`). With `holdout` = f in (0, 1), an image goes
to `test` instead when the first 8 bytes of sha256(relative path) read as a fraction are below f:
a fixed choice that does not change when other files are added or removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import ImageOps

from .meta import ShardError
from .writer import (Dataset, Split, center_crop, check_resolution, decode_image, index_key,
                     resample_filter)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MODES = {1: "L", 3: "RGB"}


def find_images(src: Path) -> list[Path]:
    """Image files under `src`, sorted by relative path (hidden files and folders skipped)."""
    found = []
    for path in src.rglob("*"):
        relative = path.relative_to(src)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() in EXTENSIONS and path.is_file():
            found.append(relative)
    return sorted(found, key=lambda p: p.as_posix())


def class_names(images: list[Path]) -> list[str] | None:
    """Sorted top-level folder names when every image lies inside one; else None."""
    if any(len(p.parts) == 1 for p in images):
        return None
    return sorted({p.parts[0] for p in images})


def is_holdout(relative: Path, fraction: float) -> bool:
    digest = hashlib.sha256(relative.as_posix().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def samples(src: Path, files: list[Path], classes: list[str] | None, split: str,
            resolution: int, channels: int, resample: str):
    """Yields (key, square RGB/L image at `resolution`, class id or None)."""
    pil_filter = resample_filter(resample)
    class_ids = {name: i for i, name in enumerate(classes or [])}
    for index, relative in enumerate(files):
        path = src / relative
        image = ImageOps.exif_transpose(decode_image(path, str(path)))
        if image.mode == "P":  # expand the palette first: PIL warns on palette transparency
            image = image.convert("RGBA")
        image = image.convert(MODES[channels])
        image = center_crop(image, min(image.size), str(path))
        image = image.resize((resolution, resolution), pil_filter)
        cls = class_ids[relative.parts[0]] if classes else None
        yield index_key(split, index), image, cls


def load(src=None, resolution: int = 32, split: str | None = None, channels: int = 3,
         holdout: float | None = None, resample: str = "bicubic") -> Dataset:
    """A folder of images as a `Dataset` (see the module docstring for classes and splits)."""
    if src is None:
        raise ValueError("imagefolder needs --src: a folder of images (class subfolders optional)")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder")
    check_resolution(resolution)
    resample_filter(resample)
    if channels not in MODES:
        raise ValueError(f"--channels {channels}: expected 1 or 3")
    if holdout is not None and not 0 < holdout < 1:
        raise ValueError(f"--holdout {holdout}: expected a fraction between 0 and 1")
    split = split or "train"
    if holdout is not None and split == "test":
        raise ValueError("--holdout writes the held-out images to 'test': choose another --split")
    files = find_images(src)
    if not files:
        raise ShardError(f"--src {src}: no images ({' '.join(EXTENSIONS)}) found")
    classes = class_names(files)
    groups = {split: files}
    if holdout is not None:
        groups = {split: [f for f in files if not is_holdout(f, holdout)],
                  "test": [f for f in files if is_holdout(f, holdout)]}
    splits = [Split(name, len(group), samples(src, group, classes, name, resolution, channels,
                                              resample))
              for name, group in groups.items()]
    options = {"crop": "center square", "resample": resample, "exif_transpose": True}
    if holdout is not None:
        options["holdout"] = holdout
    if classes:
        options["classes"] = classes
    return Dataset("imagefolder", resolution, channels, len(classes) if classes else None,
                   splits, options)
