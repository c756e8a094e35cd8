"""Converts a dataset into a bidvl shards folder (`<split>-000000.tar ...` + `meta.json`).

    python launch/make_shards.py digits --out shards/digits
    python launch/make_shards.py fashion-mnist --out shards/fashion-mnist
    python launch/make_shards.py cifar10 --src cifar-10-python.tar.gz --out shards/cifar10
    python launch/make_shards.py svhn --src SVHN/ --out shards/svhn
    python launch/make_shards.py celeba --src CelebA/ --resolution 64 --out shards/celeba64
    python launch/make_shards.py imagefolder --src photos/ --resolution 64 --holdout 0.1
    python launch/make_shards.py digits --out /srv/www/shards/digits      # any folder, e.g. one
                                                                          # a web server serves
    python launch/make_shards.py digits --out shards/digits \
        --publish s3://bucket/shards/digits                               # then copied to S3

See shards/README.md for where to get each dataset and what to expect, and docs/data.md for
training from shards on a web server or in object storage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bidvl.data.build import DATASETS, build_shards
from bidvl.data.remote import publish


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write WebDataset shards (+ meta.json) for one dataset.",
        epilog="See shards/README.md for the files each dataset expects.",
    )
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--src", help="source file or folder (digits: none; fashion-mnist: "
                                      "default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", help="shards folder to write (default: shards/DATASET)")
    parser.add_argument("--resolution", type=int, help="output size in pixels (default: "
                        "32; celeba 64)")
    parser.add_argument("--split", help="write only this split (default: all standard splits; "
                        "svhn: extra only when named; imagefolder: the split to fill, "
                        "default train)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards already in --out (once the new ones are complete)")
    parser.add_argument("--limit", type=int, help="only the first N samples of each split")
    parser.add_argument("--publish", metavar="DEST",
                        help="then copy the shards and meta.json (last) to DEST: a folder, an object "
                             "store (s3://bucket/shards/digits, gs://..., through fsspec) or a 'pipe:' "
                             "command template with {} for the file name")
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--pad", dest="fit", action="store_const", const="pad",
                     help="fashion-mnist: pad 28 px with background to the resolution (default)")
    fit.add_argument("--resize", dest="fit", action="store_const", const="resize",
                     help="fashion-mnist: resize 28 px to the resolution")
    parser.add_argument("--crop", type=int, help="celeba: center crop size before resizing "
                                                 "(default 160)")
    parser.add_argument("--channels", type=int, choices=(1, 3),
                        help="imagefolder: 1 grey or 3 RGB (default 3)")
    parser.add_argument("--holdout", type=float, help="imagefolder: fraction of images (chosen "
                        "by a hash of their path) written to split 'test'")
    parser.add_argument("--resample", choices=("bicubic", "bilinear", "lanczos", "nearest"),
                        help="PIL resize filter where images are resized (default bicubic)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = {name: getattr(args, name) for name in ("fit", "crop", "channels", "holdout",
                                                      "resample")
               if getattr(args, name) is not None}
    out = args.out or f"shards/{args.dataset}"
    start = time.perf_counter()
    try:
        meta = build_shards(args.dataset, out, src=args.src, resolution=args.resolution,
                            split=args.split, overwrite=args.overwrite, limit=args.limit,
                            **options)
    except (ValueError, OSError) as exc:  # ShardError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {name: info["count"] for name, info in meta["splits"].items()}
    shards = sum(len(info["shards"]) for info in meta["splits"].values())
    print(f"wrote {shards} shards to {out} in {time.perf_counter() - start:.1f} s: "
          f"{json.dumps(counts)}")
    if args.publish:
        try:
            written = publish(out, args.publish)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"published {len(written)} files to {args.publish}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
