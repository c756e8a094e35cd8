"""Train the small classifier whose features give FID-style scores (bidvl/evaluation/classifier.py).

    python launch/train_feature_classifier.py --shards shards/fashion_mnist \
        --out bidvl/evaluation/weights/fashion_mnist_classifier.safetensors

Reads the labelled `train` and `test` splits of a shards folder (images need `.cls` labels), trains
with Adam + cosine LR and light augmentation (random 2 px shifts, horizontal flips), reports the
test accuracy, and writes the weights with that accuracy in their metadata. Deterministic for a
seed on the CPU. The committed FashionMNIST file was made by the command above with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def load_split(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from bidvl.data import eval_stream

    images, labels, index = [], [], []
    for x, y, i in eval_stream(folder, split, 500):
        keep = i >= 0
        images.append(x[keep])
        labels.append(y[keep])
        index.append(i[keep])
    order = torch.argsort(torch.cat(index))
    y = torch.cat(labels)[order]
    if (y < 0).any():
        raise SystemExit(f"error: split {split!r} of {folder} has images without a .cls label")
    return torch.cat(images)[order], y


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


@torch.no_grad()
def accuracy(model, x, y, batch=1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="labelled shards folder with train and test splits")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--widths", default="16,32,64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="use only the first N train images (tests)")
    args = p.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out}: expected a .safetensors file name", file=sys.stderr)
        return 2

    from bidvl.data import read_meta
    from bidvl.evaluation.classifier import FeatureClassifier, save_classifier

    meta = read_meta(args.shards)
    if not meta.get("num_classes"):
        print(f"error: {args.shards}/meta.json has no num_classes: the shards carry no labels", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train = load_split(args.shards, "train")
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    x_test, y_test = load_split(args.shards, "test")
    widths = tuple(int(w) for w in args.widths.split(","))
    model = FeatureClassifier(meta["channels"], widths, meta["num_classes"])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        losses = []
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {np.mean(losses):.4f}, "
              f"test accuracy {accuracy(model, x_test, y_test):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    figures = {"test_accuracy": round(accuracy(model, x_test, y_test), 4),
               "train_accuracy": round(accuracy(model, x_train, y_train), 4),
               "train_images": len(x_train), "test_images": len(x_test), "epochs": args.epochs,
               "seed": args.seed, "train_shards": str(args.shards), "source": meta["source"]}
    save_classifier(model, args.out, meta["resolution"], **figures)
    print(json.dumps({"out": args.out, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
