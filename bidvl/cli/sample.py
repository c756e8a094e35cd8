"""Draw samples (or test reconstructions) of a run into a PNG grid and optionally a .npy file.

    python launch/sample.py --run runs/digits --num 64 --out samples.png --npy samples.npy
    python launch/sample.py --run runs/digits --num 32 --out recon.png --reconstruct

Samples are G(h), h ~ N(0, I) from --seed (sample i is the same as sample i of launch/evaluate.py's
FID set with the same seed, batch size and --bn-mode). --bn-mode train (default, as the authors)
uses batch statistics; the weights on disk are never changed. --reconstruct grids test images and
their reconstructions G(mu(v)) side by side (pairs: image, reconstruction); --npy then holds the
reconstructions. The .npy array is float32 (N, C, H, W) in [-1, 1]. --run may also be the
exported RUN_DIR/model folder alone. The generator is the EMA (generator_ema.safetensors, written
with train.ema > 0) when the weights folder has one; --no-ema uses the trained generator.
The same samples from Python: bidvl.load(RUN).sample(N, seed=SEED).
"""

import argparse
import sys
from pathlib import Path

from bidvl.config import COUNT, COUNT_OR_ZERO, SEED, ConfigError, path_problem
from bidvl.errors import BidvlError
from bidvl.io import atomic_path


def check_args(args) -> None:
    """Every option in range and both outputs writable, before anything is loaded or written."""
    from PIL import Image

    for option, value, accepted in (("--num", args.num, COUNT), ("--seed", args.seed, SEED),
                                    ("--batch-size", args.batch_size, COUNT), ("--nrow", args.nrow, COUNT_OR_ZERO)):
        accepted.check(option, value, joiner=" ")
    Image.init()
    if Image.registered_extensions().get(Path(args.out).suffix.lower()) not in Image.SAVE:
        raise ConfigError(f"--out {args.out}: expected an image file name that PIL can write (.png, .jpg, ...)")
    for option, path in (("--out", args.out), ("--npy", args.npy)):
        problem = path and path_problem(path, "file", writable=True)
        if problem:
            raise ConfigError(f"{option} {path}: {problem}")


def check_memory(args, cfg) -> None:
    """--num against the memory at hand, before anything is generated: the images (float32), their
    grid and the .npy copy, twice for --reconstruct (images and reconstructions)."""
    from bidvl.ceilings import available_memory  # (torch: loaded late, as the CLI's other imports)

    per_image = cfg.data.channels * cfg.data.resolution ** 2 * 4
    need = args.num * per_image * 3 * (2 if args.reconstruct else 1)
    have = available_memory()
    if need > have:
        raise ConfigError(f"--num {args.num}: the images need about {need / 2**30:.1f} GiB ({args.num} x "
                          f"{cfg.data.channels} x {cfg.data.resolution} x {cfg.data.resolution} float32, with "
                          f"the grid and the .npy copy), more than the {have / 2**30:.1f} GiB of memory available")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder (holds config.yaml), or its exported model/ folder")
    p.add_argument("--num", type=int, default=64, help="number of samples / test images (default: %(default)s)")
    p.add_argument("--out", required=True, help="grid PNG to write")
    p.add_argument("--npy", default="",
                   help="also save the images as a float32 .npy array in [-1, 1] (.npy appended if missing)")
    p.add_argument("--reconstruct", action="store_true", help="test images and their reconstructions")
    p.add_argument("--bn-mode", choices=("train", "eval"), default="train",
                   help="BatchNorm/net mode while generating (default: train, as the authors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100, help="samples per forward (matters in train mode)")
    p.add_argument("--checkpoint", default=None, help="latest | final | STEP | checkpoint folder")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the trained generator even when the run has an EMA of it (generator_ema.safetensors)")
    args = p.parse_args(argv)
    if args.npy and not args.npy.endswith(".npy"):
        args.npy += ".npy"  # what np.save writes
    try:
        check_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import numpy as np
    import torch
    from torchvision.utils import save_image

    from bidvl.evaluation import load_run
    from bidvl.evaluation.sampling import reconstruction_grid, sample_grid

    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run = load_run(args.run, args.checkpoint, device=device, ema=False if args.no_ema else None)
        check_memory(args, run.cfg)
        if args.reconstruct:
            images, grid = reconstruction_grid(run, args.num, args.bn_mode, device, args.nrow)
        else:
            images, grid = sample_grid(run, args.num, args.seed, args.batch_size, args.bn_mode, device,
                                       args.nrow)
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with atomic_path(args.out, suffix=Path(args.out).suffix) as tmp:  # a failed write: WriteError
            save_image(grid, str(tmp))
        if args.npy:
            array = images.detach().cpu().numpy().astype(np.float32)
            with atomic_path(args.npy, suffix=Path(args.npy).suffix) as tmp:
                np.save(str(tmp), array)
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "reconstructions" if args.reconstruct else "samples"
    print(f"wrote {len(images)} {what} of step {run.step} ({run.kind}, {run.generator} generator) to {args.out}"
          + (f" and {args.npy}" if args.npy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
