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

import os
from pathlib import Path

import torch
from torch import nn

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
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"bidvl.features": KIND, "bidvl.in_chans": str(model.in_chans),
            "bidvl.resolution": str(resolution), "bidvl.widths": ",".join(map(str, model.widths)),
            "bidvl.num_classes": str(model.num_classes),
            **{f"bidvl.{k}": str(v) for k, v in figures.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_classifier(path: str | os.PathLike, metadata: dict, state: dict) -> FeatureClassifier:
    """Builds the net that `metadata` describes and loads `state` into it (strict), in eval mode."""
    widths = tuple(int(w) for w in metadata["bidvl.widths"].split(","))
    model = FeatureClassifier(int(metadata["bidvl.in_chans"]), widths, int(metadata["bidvl.num_classes"]))
    model.load_state_dict(state)
    return model.eval()
