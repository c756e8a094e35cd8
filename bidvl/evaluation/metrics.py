"""Test reconstruction RMSE and OOD AUROC (Tables 3 and 4 of the paper).

Reconstruction uses the encoder mean, not a sample: v_rec = G(mu(v)). With SSE_n = sum over all
C*H*W pixel values of image n of (v_rec - v)^2 on the [-1, 1] scale and N images of P = C*H*W
values each, we report

    rmse          = sqrt(sum_n SSE_n / (N * P))     root mean squared error per pixel value, [-1, 1]
    rmse_01       = rmse / 2                        the same on the [0, 1] scale (x01 = (x + 1) / 2)
    sse_per_image = sum_n SSE_n / N                 the authors' summed squared error per image

in two BatchNorm modes. The headline (`rmse`, `eval/rmse`) is the authors' metric
(`metrics/reconstruction_metric.py` calls the nets without `.eval()`): encoder and generator in
*train* mode, i.e. BatchNorm with the statistics of each test batch, the test images taken in index
order in batches of the evaluation batch size, as their unshuffled DataLoader (our running
statistics and spectral-norm vectors are restored afterwards; theirs were updated). Beside it,
`rmse_running_stats` (`eval/rmse_running_stats`): both nets in eval mode, BatchNorm with its running
statistics. The two differ for nets with BatchNorm (DCGAN encoder, both generators); in BiDVL about
half of what the encoder's running statistics saw were generated images.

OOD detection scores an image by -E(v) (higher = more in-distribution; energy net in eval mode) and
reports sklearn's roc_auc_score with the in-distribution test images as positives (label 1) and one
OOD set at a time as negatives (label 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from bidvl.data import ShardError, eval_stream, read_meta
from bidvl.data.meta import foreign_shards, is_foreign_folder

from .gather import IndexedRows, process_layout, progress, rounds
from .loading import EvalError
from .sampling import dealt_batches, forward_in_mode, index_of, uniform_noise


@torch.no_grad()
def reconstruction_sse(encoder: nn.Module, generator: nn.Module, v: torch.Tensor,
                       bn_mode: str = "eval") -> torch.Tensor:
    """(B,) float64: per image, the sum over pixel values of (G(mu(v)) - v)^2, both nets in
    `bn_mode` (train: batch statistics of `v`; buffers restored)."""
    mu, _ = forward_in_mode(encoder, bn_mode, v)
    recon = forward_in_mode(generator, bn_mode, mu).float()
    return (recon - v.float()).double().pow(2).flatten(1).sum(1)


@torch.no_grad()
def energies(energy_net: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """(B,) float64 energies E(v) (eval mode)."""
    return forward_in_mode(energy_net, "eval", v).double().reshape(len(v))


def rmse_figures(sse: np.ndarray, pixels_per_image: int) -> dict:
    """The three reconstruction figures (see the module docstring) from per-image SSE values."""
    n = len(sse)
    if n == 0:
        raise EvalError("no test images to reconstruct")
    total = float(np.sum(sse, dtype=np.float64))
    rmse = math.sqrt(total / (n * pixels_per_image))
    return {"rmse": rmse, "rmse_01": rmse / 2.0, "sse_per_image": total / n, "num_images": n}


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of separating in- (positive) from out-of-distribution scores."""
    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    return float(roc_auc_score(labels, np.concatenate([in_scores, out_scores])))


def _limited(index: torch.Tensor, max_count: int) -> torch.Tensor:
    if max_count > 0:
        index = torch.where(index < max_count, index, torch.full_like(index, -1))
    return index


def heldout_pass(accelerator, nets, folder: str, split: str, batch_size: int, *,
                 max_count: int = 0, reconstruct: bool = True, energy: bool = True,
                 num_workers: int = 0, fit: tuple[int, int] = (0, 0)) -> dict[str, np.ndarray]:
    """One pass over a split (this rank's share) -> gathered {"index", "sse"?, "energy"?} in index
    order; only the first `max_count` images (by index) when max_count > 0."""
    device, rank, world, _ = process_layout(accelerator)
    columns = [name for name, wanted in (("sse", reconstruct), ("energy", energy)) if wanted]
    rows = IndexedRows(accelerator)
    stream = eval_stream(folder, split, batch_size, rank=rank, world_size=world,
                         num_workers=num_workers, resolution=fit[0], channels=fit[1])
    for images, _, index in progress(stream, accelerator, f"{Path(folder).name}/{split}", len(stream)):
        index = _limited(index, max_count)
        if not (index >= 0).any():  # nothing of ours in this batch: skip the nets
            rows.add_padding(len(index), torch.float64, **dict.fromkeys(columns, ()))
            continue
        v = images.to(device)
        values = {}
        if reconstruct:
            values["sse"] = reconstruction_sse(nets.encoder, nets.generator, v)
        if energy:
            values["energy"] = energies(nets.energy_net, v)
        rows.add(index, **values)
    return rows.result()


def batch_statistics_pass(accelerator, nets, folder: str, split: str, batch_size: int, *,
                          max_count: int = 0, num_workers: int = 0, fit: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The authors' reconstruction SSE per image (nets in train mode: BatchNorm normalises with
    each batch's statistics), gathered in index order; the first `max_count` images when > 0.

    The batches must not depend on the number of processes: every rank reads the whole split as
    one process would (index order, `batch_size` images a batch) and reconstructs the batches
    b with b % world_size == rank."""
    device, rank, world, _ = process_layout(accelerator)
    rows = IndexedRows(accelerator)
    stream = eval_stream(folder, split, batch_size, rank=0, world_size=1, num_workers=num_workers,
                         resolution=fit[0], channels=fit[1])
    for b, (images, _, index) in enumerate(progress(stream, accelerator, f"{Path(folder).name}/{split} "
                                                    "(batch statistics)", len(stream))):
        keep = (index >= 0) & (index < max_count) if max_count > 0 else index >= 0  # no padding rows:
        images, index = images[keep], index[keep]  # they would enter the batch statistics
        if b % world != rank or len(index) == 0:
            rows.add_padding(batch_size, torch.float64, sse=())
            continue
        sse = reconstruction_sse(nets.encoder, nets.generator, images.to(device), "train")
        pad = batch_size - len(index)  # same row count on every rank for the gather
        rows.add(torch.cat([index, torch.full((pad,), -1, dtype=index.dtype)]),
                 sse=torch.cat([sse, torch.zeros(pad, dtype=sse.dtype, device=sse.device)]))
    return rows.result()["sse"]


def uniform_pass(accelerator, energy_net: nn.Module, count: int, shape: tuple[int, int, int],
                 batch_size: int, seed: int = 0) -> np.ndarray:
    """Energies of `count` U[-1, 1] noise images of `shape`, the same set whatever the world size."""
    device, rank, world, _ = process_layout(accelerator)
    rows = IndexedRows(accelerator)
    batches = dealt_batches(count, batch_size, rank, world)
    for positions in progress(batches, accelerator, "uniform noise", rounds(count, batch_size, world)):
        if positions is None:  # no batch for this rank in the last round
            rows.add_padding(batch_size, torch.float64, energy=())
            continue
        noise = uniform_noise(positions, shape, seed).to(device)
        rows.add(index_of(positions, count), energy=energies(energy_net, noise))
    return rows.result()["energy"]


def ood_split(folder: str | Path, resolution: int, channels: int, preferred: str = "test") -> str:
    """The split of an OOD shards folder to score (`preferred`, else its only split); checks that
    its images have the run's resolution and channels. A folder of shards written by another tool
    (no meta.json) is fitted to them: its `preferred` split where it has one, else its 'train'."""
    if is_foreign_folder(folder):
        try:
            foreign_shards(Path(folder), preferred)
            return preferred
        except ShardError:
            return "train"
    meta = read_meta(folder)
    for key, expected in (("resolution", resolution), ("channels", channels)):
        if meta[key] != expected:
            raise EvalError(
                f"--ood {folder}: its images have {key} {meta[key]} (meta.json), the run's have "
                f"{key} {expected}; write OOD shards at the run's size with launch/make_shards.py"
            )
    splits = list(meta["splits"])
    if preferred in splits:
        return preferred
    if len(splits) == 1:
        return splits[0]
    raise EvalError(f"--ood {folder}: no {preferred!r} split and more than one split "
                    f"({', '.join(splits)}): cannot tell which to use")
