"""A small image classifier whose penultimate layer is a feature space for FID-style scores.

For datasets far from ImageNet (FashionMNIST, 1 channel, 32 px) Inception features say little and
its weights are not always at hand. `launch/train_feature_classifier.py` trains this net on a
labelled shards split and writes a `--features` file:

    safetensors state dict + metadata bidvl.features = "classifier", bidvl.in_chans,
    bidvl.resolution, bidvl.widths ("16,32,64"), bidvl.num_classes, and the figures of its
    training (bidvl.test_accuracy, bidvl.train_shards, ...).

safetensors holds tensors only: loading it runs no code (the guarantee `torch.load(...,
weights_only=True)` gives for pickles). The feature of an image in [-1, 1] is the global average
of the last conv block: `widths[-1]` values after ReLU (64-d by default).
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import save_file

from bidvl.data import eval_stream, read_meta
from bidvl.io import atomic_path
from bidvl.models import cpu_state_dict

KIND = "classifier"


class FeatureClassifier(nn.Module):
    """3 blocks of conv3x3-BN-ReLU-conv3x3-BN-ReLU-maxpool, global average pool, linear head."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (16, 32, 64), num_classes: int = 10):
        super().__init__()
        layers, c = [], in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.in_chans, self.widths, self.num_classes = in_chans, tuple(widths), num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(model: FeatureClassifier, path: str | os.PathLike, resolution: int, **figures) -> None:
    """Atomic write of a `--features` file (see the module docstring); `figures` go to metadata."""
    meta = {"bidvl.features": KIND, "bidvl.in_chans": str(model.in_chans),
            "bidvl.resolution": str(resolution), "bidvl.widths": ",".join(map(str, model.widths)),
            "bidvl.num_classes": str(model.num_classes),
            **{f"bidvl.{k}": str(v) for k, v in figures.items()}}
    with atomic_path(path) as tmp:
        save_file(cpu_state_dict(model), str(tmp), metadata=meta)


def load_classifier(metadata: dict, state: dict) -> FeatureClassifier:
    """Builds the net that `metadata` describes and loads `state` into it (strict), in eval mode."""
    widths = tuple(int(w) for w in metadata["bidvl.widths"].split(","))
    model = FeatureClassifier(int(metadata["bidvl.in_chans"]), widths, int(metadata["bidvl.num_classes"]))
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- training


def load_split(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory, in index order: images in [-1, 1] and their labels."""
    images, labels, index = [], [], []
    for x, y, i in eval_stream(folder, split, 500):
        keep = i >= 0
        images.append(x[keep])
        labels.append(y[keep])
        index.append(i[keep])
    order = torch.argsort(torch.cat(index))
    y = torch.cat(labels)[order]
    if (y < 0).any():
        raise ValueError(f"split {split!r} of {folder} has images without a .cls label")
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


def train_classifier(shards: str, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                     widths: tuple[int, ...] = (16, 32, 64), seed: int = 0, limit: int = 0,
                     log=print) -> tuple[FeatureClassifier, dict]:
    """Adam + one-cycle LR, random flips and 2 px shifts, on the `train` split of a labelled shards
    folder; returns the net (eval mode) and its figures (test accuracy on the `test` split)."""
    meta = read_meta(shards)
    if not meta.get("num_classes"):
        raise ValueError(f"{shards}/meta.json has no num_classes: the shards carry no labels")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_split(shards, "train")
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    x_test, y_test = load_split(shards, "test")
    model = FeatureClassifier(meta["channels"], widths, meta["num_classes"])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(perm):.4f}, "
            f"test accuracy {accuracy(model, x_test, y_test):.4f} ({time.perf_counter() - t0:.0f} s)")
    figures = {"test_accuracy": round(accuracy(model, x_test, y_test), 4),
               "train_accuracy": round(accuracy(model, x_train, y_train), 4),
               "train_images": len(x_train), "test_images": len(x_test), "epochs": epochs,
               "seed": seed, "train_shards": str(shards), "source": meta["source"],
               "resolution": meta["resolution"]}
    return model.eval(), figures
