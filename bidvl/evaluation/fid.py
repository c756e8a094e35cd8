"""FID: generated samples vs reference statistics of a shards split, in a chosen feature space.

    extractor = feature_extractor(features="", inception_weights="inception.pth")  # or --features
    reference = reference_statistics(accelerator, extractor, "shards/cifar10", "train")  # cached
    generated = sample_features(accelerator, extractor, generator, 50_000, latent_dim, (3, 32, 32))
    fid = frechet_distance(*statistics(generated), reference["mu"], reference["sigma"])

The extractors and their file formats, the reference cache and the distance: docs/fid.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bidvl.data import eval_stream, remote, split_info
from bidvl.extras import require
from bidvl.io import atomic_path, file_sha256
from bidvl.models import cpu_state_dict

from .classifier import load_classifier
from .gather import IndexedRows, broadcast_from_main, process_layout, progress, rounds
from .loading import EvalError
from .sampling import dealt_batches, generate, index_of, local_batchnorm

ENV_WEIGHTS = "BIDVL_INCEPTION_WEIGHTS"
PUBLISHED_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
PUBLISHED_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{PUBLISHED_WEIGHTS}"


def hub_cache_weights() -> Path:
    """Where torch.hub (and so torch-fidelity, which fetches them with
    torch.hub.load_state_dict_from_url) keeps the published weights: TORCH_HOME/hub/checkpoints
    (default ~/.cache/torch/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / PUBLISHED_WEIGHTS


def inception_weights_file(given: str = "") -> str:
    """The Inception weights to use, the one place that looks for them: `given` (--inception-weights,
    eval.inception_weights), else BIDVL_INCEPTION_WEIGHTS, else the copy in torch's hub cache if there
    is one; "" when there is none. Nothing is downloaded here (see `download_inception_weights`)."""
    if given or os.environ.get(ENV_WEIGHTS):
        return given or os.environ[ENV_WEIGHTS]
    cached = hub_cache_weights()
    return str(cached) if cached.is_file() else ""


def weights_help() -> str:
    return (f"FID needs the TF-compatible Inception-v3 weights (torch-fidelity's {PUBLISHED_WEIGHTS}): "
            f"pass --inception-weights PATH (eval.inception_weights in a config), set {ENV_WEIGHTS}=PATH, "
            f"or put the file in torch's hub cache, {hub_cache_weights()}, where torch-fidelity keeps it "
            f"(it is found there). Where a network is at hand, launch/evaluate.py --download-weights "
            f"fetches it there once ({PUBLISHED_URL}); training never downloads. "
            f"Or pass --features PATH for an FID-style figure in another feature space")


def download_inception_weights(url: str = "") -> Path:
    """Fetches the published weights into torch's hub cache (opt-in: launch/evaluate.py
    --download-weights); the file appears whole or not at all (torch.hub writes a temporary file
    beside it and renames it). Returns its path; an existing file is kept."""
    dst = hub_cache_weights()
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url or PUBLISHED_URL, str(dst), progress=False)
    except Exception as exc:  # URLError, HTTPError, OSError, ...
        raise EvalError(f"could not download the Inception weights from {url or PUBLISHED_URL} to {dst} "
                        f"({type(exc).__name__}: {exc}). {weights_help()}") from None
    return dst


CACHE_VERSION = "bidvl-fid-reference/1"


# ---------------------------------------------------------------- Fréchet distance


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2). tr (S1 S2)^(1/2) comes from the
    eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2): no general matrix square root, no imaginary
    parts (docs/fid.md)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # only rounding makes it negative


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with N-1) of (N, D) features, float64."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise EvalError(f"FID needs at least 2 images per side, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


# ---------------------------------------------------------------- feature extractors


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, C, H, W) -> uint8 (B, 3, H, W): round((x + 1) * 127.5), gray repeated."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class Features:
    """images in [-1, 1] (B, C, H, W) -> (B, D) float32 features."""

    name: str  # shown in labels
    identity: str  # changes whenever the features could change (keys the reference cache)
    comparable: bool  # True only for the TF-compatible Inception

    def __init__(self):
        self._dims: dict[tuple, int] = {}

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.extract(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(len(images), -1).float()

    def dim(self, channels: int, resolution: int, device) -> int:
        """Feature size for this image shape (one dummy forward the first time)."""
        key = (channels, resolution)
        if key not in self._dims:
            self._dims[key] = self(torch.zeros(1, channels, resolution, resolution, device=device)).shape[1]
        return self._dims[key]

    @property
    def label(self) -> str:
        if self.comparable:
            return "FID (TF-compatible Inception-v3, torch-fidelity inception-v3-compat, 2048-d)"
        return f"FID-style (features: {self.name}), not comparable to published FID"


class InceptionFeatures(Features):
    comparable = True

    def __init__(self, weights: str | os.PathLike, device="cpu"):
        super().__init__()

        FeatureExtractorInceptionV3 = require("torch_fidelity.feature_extractor_inceptionv3",
                                              EvalError).FeatureExtractorInceptionV3

        path = Path(weights)
        if not path.is_file():
            raise EvalError(f"Inception weights file {path} does not exist. {weights_help()}")
        try:  # tensors only: refuses a file that would run code when unpickled
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EvalError(f"Inception weights file {path}: not a plain state dict of tensors ({exc})") from None
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            ).to(device)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise EvalError(f"Inception weights file {path} does not fit Inception-v3: {first}") from None
        self.name = f"inception-v3-compat ({path.name})"
        self.sha256 = file_sha256(path)
        self.identity = f"inception-v3-compat/2048/uint8-round/sha256:{self.sha256}"

    def extract(self, images):
        return self.net(to_uint8_rgb(images))

    def dim(self, channels, resolution, device) -> int:
        return 2048


class TorchScriptFeatures(Features):
    comparable = False

    def __init__(self, path: str | os.PathLike, device="cpu"):
        super().__init__()
        path = Path(path)
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:
            raise EvalError(f"--features {path}: not a TorchScript file ({exc})") from None
        self.name = path.name
        self.identity = f"torchscript/sha256:{file_sha256(path)}"

    def extract(self, images):
        return self.net(images.float())


def read_safetensors(path: Path, tensors: bool = True) -> tuple[dict, dict]:
    """(metadata, state dict) of a `--features` file; tensors=False reads the header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, (load_file(str(path)) if tensors else {})
    except Exception as exc:
        raise EvalError(f"--features {path}: not a readable safetensors file ({exc})") from None


class ClassifierFeatures(Features):
    """`bidvl.features = classifier` files (bidvl/evaluation/classifier.py): penultimate layer."""

    comparable = False

    def __init__(self, path: str | os.PathLike, device="cpu"):
        super().__init__()

        path = Path(path)
        meta, state = read_safetensors(path)
        try:
            self.net = load_classifier(meta, state).to(device)
        except Exception as exc:
            first = str(exc).splitlines()[0]
            raise EvalError(f"--features {path}: metadata does not describe its tensors: {first}") from None
        self.in_chans, self.resolution = int(meta["bidvl.in_chans"]), int(meta["bidvl.resolution"])
        self.name = f"{path.name} (classifier, {meta.get('bidvl.widths')})"
        self.identity = f"classifier/sha256:{file_sha256(path)}"

    def extract(self, images):
        if images.shape[1] != self.in_chans or images.shape[-1] != self.resolution:
            raise EvalError(f"features {self.name} take {self.in_chans}-channel {self.resolution} px "
                            f"images, got {images.shape[1]}-channel {images.shape[-1]} px")
        return self.net.features(images.float())


class TimmFeatures(Features):
    comparable = False

    def __init__(self, path: str | os.PathLike, device="cpu"):
        super().__init__()

        timm = require("timm", EvalError)
        path = Path(path)
        meta, state = read_safetensors(path)
        if meta.get("bidvl.features") != "timm" or not meta.get("bidvl.timm_name"):
            raise EvalError(f"--features {path}: metadata needs bidvl.features=timm and "
                            f"bidvl.timm_name (see docs/fid.md)")
        self.in_chans = int(meta.get("bidvl.in_chans", "3"))
        self.input_size = int(meta.get("bidvl.input_size", "0"))
        try:
            self.net = timm.create_model(meta["bidvl.timm_name"], pretrained=False, num_classes=0,
                                         in_chans=self.in_chans)
            self.net.load_state_dict(state)
        except Exception as exc:
            first = str(exc).splitlines()[0]
            raise EvalError(f"--features {path}: cannot build timm model "
                            f"{meta['bidvl.timm_name']!r} from it: {first}") from None
        self.net.to(device).eval()
        self.name = f"{path.name} (timm {meta['bidvl.timm_name']})"
        self.identity = f"timm/sha256:{file_sha256(path)}"

    def extract(self, images):
        x = images.float()
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        return self.net(x)


def save_timm_features(model: torch.nn.Module, timm_name: str, path: str | os.PathLike,
                       in_chans: int = 3, input_size: int = 0) -> None:
    """Write a `--features` file for a timm model made with num_classes=0 (docs/fid.md)."""
    save_file(cpu_state_dict(model), str(path),
              metadata={"bidvl.features": "timm", "bidvl.timm_name": timm_name,
                        "bidvl.in_chans": str(in_chans), "bidvl.input_size": str(input_size)})


def feature_extractor(features: str = "", inception_weights: str = "", device="cpu",
                      required: bool = True) -> Features | None:
    """The extractor for `features` (--features, eval.features) if given, else Inception with the
    weights `inception_weights_file` finds. None when there are none and not `required` (periodic
    evaluation and health checks then skip their feature figures); an EvalError saying where to put
    them when `required`."""
    if features:
        path = Path(features)
        if not path.is_file():
            raise EvalError(f"--features {path}: no such file")
        if path.suffix == ".safetensors":
            kind = read_safetensors(path, tensors=False)[0].get("bidvl.features")
            return (ClassifierFeatures if kind == "classifier" else TimmFeatures)(path, device)
        return TorchScriptFeatures(path, device)
    weights = inception_weights_file(inception_weights)
    if not weights:
        if not required:
            return None
        raise EvalError(f"no Inception weights found. {weights_help()}")
    return InceptionFeatures(weights, device)


# ---------------------------------------------------------------- statistics


def reference_key(extractor: Features, folder: str | os.PathLike, split: str,
                  fit: tuple[int, int] = (0, 0)) -> str:
    """sha256 of the extractor identity, the split's meta.json and its shards' contents.

    Local shards: the bytes of meta.json and of every shard (a rewritten shard is a new key).
    Remote sources (a URL, a `pipe:` template, a shard list; docs/data.md) are not read here:
    the key covers the source string and the split's meta.json entry, whose per-shard sha256
    launch/make_shards.py writes, so a rewritten dataset is a new key without downloading it.
    Shards written before make_shards recorded digests are keyed by name and count only; their
    cached statistics are reused until the cache file is deleted (a warning says so)."""
    meta, shards, counts = split_info(folder, split, None, 0, *fit)
    h = hashlib.sha256()
    h.update(f"{CACHE_VERSION}\n{extractor.identity}\n{split}\n".encode())
    if not remote.is_remote(str(folder)) and not remote.is_list(str(folder)):
        meta_file = Path(remote.local_path(str(folder))) / "meta.json"
        # Shards without meta.json: their images are fitted to the run's size (part of the key).
        h.update(meta_file.read_bytes() if meta_file.is_file() else
                 f"{meta['format']} {meta['resolution']} {meta['channels']}\n".encode())
        for shard, count in zip(shards, counts):
            h.update(f"{shard.name}:{count}:{file_sha256(shard)}\n".encode())
        return h.hexdigest()
    h.update(f"{folder}\n".encode())
    entries = meta["splits"][split]["shards"]
    h.update(json.dumps(entries, sort_keys=True).encode())
    if not all("sha256" in e for e in entries):
        warnings.warn(f"reference statistics of {folder} (split {split}): its meta.json records no shard "
             "digests (written by an older launch/make_shards.py), so the cache is keyed by shard "
             "names and counts only; delete the cached .npz if the shards change")
    return h.hexdigest()


def _cache_paths(folder, split, key, fallback_dir) -> list[Path]:
    """The shards folder's fid_stats/ (local folders), then `fallback_dir` (the run's eval/cache);
    remote sources are cached in `fallback_dir` only."""
    name = f"{split}-{key[:20]}.npz"
    source = str(folder)
    if remote.is_remote(source) or remote.is_list(source):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", remote.basename(source.rstrip("/"))).strip("._") or "remote"
        return [Path(fallback_dir) / f"{slug}-{name}"] if fallback_dir else []
    folder = Path(remote.local_path(source))
    paths = [folder / "fid_stats" / name]
    if fallback_dir:
        paths.append(Path(fallback_dir) / f"{folder.resolve().name}-{name}")
    return paths


def _load_cached(path: Path, key: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {"mu": z["mu"], "sigma": z["sigma"], "count": int(z["count"]), "cache": str(path)}
    except (OSError, ValueError, KeyError):
        return None  # unreadable or partial: recompute


def _save_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def reference_statistics(accelerator, extractor: Features, folder: str, split: str,
                         batch_size: int = 100, fallback_dir: str | os.PathLike = "",
                         num_workers: int = 0, fit: tuple[int, int] = (0, 0)) -> Optional[dict]:
    """{"mu", "sigma", "count", "cache"} of every image of the split on the main process (None on
    the others). Computed over all ranks on a cache miss, then cached (docs/fid.md)."""
    device, rank, world, is_main = process_layout(accelerator)
    key, cached = None, None
    if is_main:
        key = reference_key(extractor, folder, split, fit)
        cached = next(filter(None, (_load_cached(p, key) for p in _cache_paths(
            folder, split, key, fallback_dir))), None)
    key, hit = broadcast_from_main(accelerator, (key, cached is not None))
    if hit:
        return cached
    rows = IndexedRows(accelerator)
    stream = eval_stream(folder, split, batch_size, rank=rank, world_size=world, num_workers=num_workers,
                         resolution=fit[0], channels=fit[1])
    for images, _, index in progress(stream, accelerator, f"reference features ({split})", len(stream)):
        if (index >= 0).any():
            rows.add(index, features=extractor(images.to(device)))
        else:  # only padding: skip the extractor
            rows.add_padding(len(index), features=(extractor.dim(images.shape[1], images.shape[-1], device),))
    if not is_main:
        return None
    features = rows.result()["features"]
    mu, sigma = statistics(features)
    saved = ""
    for path in _cache_paths(folder, split, key, fallback_dir):
        try:
            _save_npz(path, mu=mu, sigma=sigma, count=np.int64(len(features)), key=np.str_(key),
                      identity=np.str_(extractor.identity))
            saved = str(path)
            break
        except OSError:
            continue
    return {"mu": mu, "sigma": sigma, "count": len(features), "cache": saved}


def sample_features(accelerator, extractor: Features, generator: torch.nn.Module, num: int,
                    latent_dim: int, shape: tuple[int, int, int], seed: int = 0,
                    batch_size: int = 100, bn_mode: str = "train") -> Optional[np.ndarray]:
    """(num, D) features of generated samples 0..num-1 on the main process (None elsewhere); every
    rank generates its dealt batches (see bidvl.evaluation.sampling)."""
    device, rank, world, is_main = process_layout(accelerator)
    generator = local_batchnorm(generator)
    rows = IndexedRows(accelerator)
    batches = dealt_batches(num, batch_size, rank, world)
    for positions in progress(batches, accelerator, "generated features", rounds(num, batch_size, world)):
        if positions is None:  # no batch for this rank in the last round
            rows.add_padding(batch_size, features=(extractor.dim(shape[0], shape[1], device),))
            continue
        images = generate(generator, positions, latent_dim, seed, bn_mode, device)
        rows.add(index_of(positions, num), features=extractor(images))
    return rows.result()["features"] if is_main else None
