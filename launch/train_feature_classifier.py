"""Train the small classifier whose features give FID-style scores (bidvl/evaluation/classifier.py).

    python launch/train_feature_classifier.py --shards shards/fashion_mnist \
        --out bidvl/evaluation/weights/fashion_mnist_classifier.safetensors

Reads the labelled `train` and `test` splits of a shards folder (images need `.cls` labels), trains
(Adam, one-cycle LR, random flips and 2 px shifts), reports the test accuracy and writes the
weights with their figures in the file's metadata. Deterministic for a seed on the CPU. The
committed FashionMNIST file was made by the command above with the defaults.
"""

import argparse
import json
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="labelled shards folder with train and test splits")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--widths", default="16,32,64", help="channels of the three conv blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N train images (tests)")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out}: expected a .safetensors file name", file=sys.stderr)
        return 2

    from bidvl.errors import BidvlError
    from bidvl.evaluation.classifier import save_classifier, train_classifier

    try:
        widths = tuple(int(w) for w in args.widths.split(","))
        model, figures = train_classifier(args.shards, args.epochs, args.batch_size, args.lr, widths,
                                          args.seed, args.limit, log=lambda m: print(m, flush=True))
    except (BidvlError, ValueError) as exc:  # (ValueError: --widths)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_classifier(model, args.out, figures.pop("resolution"), **figures)
    print(json.dumps({"out": args.out, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
