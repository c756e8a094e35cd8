"""Streaming reader: shards folder -> batches of float tensors in [-1, 1] for this rank.

Training (`train_stream`) — every rank yields the same number of batches per epoch, and the stream
is a pure function of (seed, rank, batch index), so a resumed run sees exactly the batches the
uninterrupted one would have:

* Each rank's stream is served by R = max(1, num_workers) "roles". Role r produces the batches
  whose index b satisfies b % R == r; within an epoch it reads resampled shards (shards drawn with
  replacement, `webdataset` style) through a shuffle buffer, with an RNG seeded by
  (seed, rank, role, epoch), and stops after exactly `per_role` batches (the `with_epoch` rule),
  so ranks and workers never run out at different times (no DDP hang at epoch end).
* batches_per_epoch (per rank) = R * ceil(count / (batch_size * world_size * R)).
* Resuming at batch index b: worker w of the new DataLoader plays role (b + w) % R starting at
  that role's local index (b + w) // R, so the DataLoader's round-robin order continues exactly.
  Skipped samples are read from the tar but never decoded.

Evaluation (`eval_stream`) — each sample exactly once across ranks: whole shards are dealt to ranks
round-robin when there are at least as many shards as ranks, otherwise single samples are
(sample i -> rank i % world). Every batch is padded to exactly `batch_size` (padding repeats a
sample and carries index -1) and every rank yields the same number of batches (ranks with fewer
samples add all-padding batches), so `gather` never hangs and never sees ragged shapes; callers
drop rows with index -1 after gathering.

Sources (bidvl.data.remote): a local folder (memory-mapped), a folder URL (http(s), or any scheme
webdataset.gopen handles), a `pipe:` command template, or an explicit brace-expanded shard list.
The same strict checks apply to every source and errors name the URL or command.

Decoding is restricted: a sample may hold `png` (or another image extension), `cls` and `json`.
Any other member (e.g. `.pyd`, `.pickle`) is an error naming the shard and member; nothing is
ever unpickled.
"""

from __future__ import annotations

import io
import math
import random
import sys
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import remote
from .meta import FOREIGN, ShardError, split_info
from .tarstream import tar_samples
from . import workers as loader_workers

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
ALLOWED = set(IMAGE_EXTENSIONS) | {"cls", "json"}
# An image header announcing more pixels than this is refused before decoding (decompression bomb).
MAX_PIXELS = 4096 * 4096
# data.on_error=skip warns in full about the first few bad samples or shards of each loader worker,
# then with one summary line at the 8th, 16th, 32nd, ... (a shard of only bad data is not a flood).
FULL_WARNINGS = 5
AUGMENT = 0x415547  # a seed part of the crop/flip RNG, apart from the sample-order RNG


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SampleDecoder:
    """Turns a raw sample into (CHW uint8 array, label); strict about content.

    bidvl's own shards (meta.json) hold images at the final size and mode: anything else is an
    error. Shards written by other tools (`fit=True`: no meta.json) hold images of any size and
    mode: each is converted to the mode of `channels`, resized so that its shorter side is
    `resolution` (bicubic, as torchvision's Resize(int); JPEGs decoded at a reduced scale first
    where they are at least twice as large, see `__call__`) and cropped to a square, in the centre or,
    in training with `crop="random"`, at a random place (torchvision's RandomCrop), as diffusers'
    training scripts offer. `flip=True` mirrors half the training images left to right (either
    kind of shard). The random choices come from the `rng` the caller gives per batch (a pure
    function of seed, rank, worker role, epoch and batch: exact on resume); without one (evaluation)
    images are centre-cropped and never flipped.

    Conversion to float in [-1, 1] happens once per batch in `_collate` (cheaper than per image).
    """

    def __init__(self, resolution: int, channels: int, fit: bool = False, crop: str = "center",
                 flip: bool = False):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop={crop!r}: expected center or random")
        self.resolution = resolution
        self.channels = channels
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.fit, self.crop, self.flip = fit, crop, flip

    @property
    def random(self) -> bool:
        """Whether training images need an rng (random crop of fitted images, or flips)."""
        return self.flip or (self.fit and self.crop == "random")

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[np.ndarray, int]:
        where = f"shard {sample.get('__url__', '?')}, sample {sample.get('__key__', '?')}"
        members = [k for k in sample if not k.startswith("__")]
        allowed = ALLOWED | ({"txt"} if self.fit else set())  # captions of other tools' shards: unused
        for k in members:
            if k not in allowed:
                raise ShardError(
                    f"{where}: member .{k} is not allowed (expected an image, .cls or .json; "
                    f"pickles are never decoded)"
                )
        images = [k for k in members if k in IMAGE_EXTENSIONS]
        if len(images) != 1:
            raise ShardError(f"{where}: expected exactly one image member, found {images or 'none'}")
        try:
            im = Image.open(io.BytesIO(sample[images[0]]))
            if im.width * im.height > MAX_PIXELS:
                raise ShardError(
                    f"{where}: image header says {im.width}x{im.height}, refusing to decode "
                    f"(more than {MAX_PIXELS} pixels)"
                )
            if self.fit and im.format == "JPEG":
                # Decode at the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still at
                # least `resolution` (libjpeg's DCT scaling): 2-4x faster for large photos.
                im.draft(self.mode, (self.resolution, self.resolution))
            im.load()
            if self.fit:
                im = self._fitted(im, rng)
        except ShardError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt data
            raise ShardError(f"{where}: member .{images[0]} is not a readable image ({exc})") from None
        if im.size != (self.resolution, self.resolution):
            raise ShardError(
                f"{where}: image is {im.width}x{im.height}, expected "
                f"{self.resolution}x{self.resolution} (meta.json resolution)"
            )
        if im.mode != self.mode:
            raise ShardError(f"{where}: image mode {im.mode}, expected {self.mode} ({self.channels} channels)")
        array = np.asarray(im, dtype=np.uint8)
        image = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if self.flip and rng is not None and rng.random() < 0.5:
            image = np.ascontiguousarray(image[:, :, ::-1])
        label = -1
        if "cls" in sample:
            try:
                label = int(sample["cls"].decode("ascii").strip())
            except (UnicodeDecodeError, ValueError):
                raise ShardError(f"{where}: member .cls is not an integer") from None
        return image, label

    def _fitted(self, im: Image.Image, rng: random.Random | None) -> Image.Image:
        if im.mode != self.mode:
            # Transparent pixels over black, palettes and CMYK resolved, as PIL converts them.
            im = im.convert(self.mode)
        r = self.resolution
        w, h = im.size
        if min(w, h) != r:  # the shorter side to r, the longer one scaled with it (truncated)
            w, h = (r, max(r, int(r * h / w))) if w <= h else (max(r, int(r * w / h)), r)
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        if (w, h) != (r, r):
            if self.crop == "random" and rng is not None:
                left, top = rng.randint(0, w - r), rng.randint(0, h - r)
            else:
                left, top = int(round((w - r) / 2.0)), int(round((h - r) / 2.0))
            im = im.crop((left, top, left + r, top + r))
        return im


def shuffled(samples: Iterator, bufsize: int, initial: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: fills to `initial` items, then yields a random one for each item read
    (while below `bufsize` it reads two per yield, so it grows to `bufsize`), and empties itself
    at the end. It makes exactly the `rng` calls webdataset's shuffle filter (webdataset 0.2-1.0)
    makes, so data orders, and weights trained before this was our own, stay the same."""
    initial = min(initial, bufsize)
    buf = []
    for sample in samples:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(samples))
            except StopIteration:
                pass
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    """Removes and returns a random item (the last one takes its place)."""
    k = rng.randint(0, len(buf) - 1)
    item = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return item


def _digests(meta: dict, split: str, shards) -> dict:
    """str(shard) -> the sha256 meta.json records for it (shards written by make_shards)."""
    return {str(s): e["sha256"] for s, e in zip(shards, meta["splits"][split]["shards"]) if "sha256" in e}


def _decoder(meta: dict, crop: str = "center", flip: bool = False) -> SampleDecoder:
    return SampleDecoder(meta["resolution"], meta["channels"], meta["format"] == FOREIGN, crop, flip)


def _own_generator() -> torch.Generator:
    """For the DataLoader's per-iterator base seed, which it would otherwise draw from torch's
    global RNG. That RNG also draws the training noise and is checkpointed: a resumed run (or a
    rollback, or a periodic evaluation) that opens a loader drew once more than the uninterrupted
    run, so resuming with data.num_workers >= 1 was not bit-exact. Our workers use no torch
    randomness (sample order comes from seeded `random.Random`s), so the seed's value is unused."""
    return torch.Generator().manual_seed(0)


def _to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float32 in [-1, 1]."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0)


def _collate(items: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = _to_float(np.stack([x for x, _ in items]))
    return images, torch.tensor([y for _, y in items], dtype=torch.long)


# ---------------------------------------------------------------- training


def _shard_samples(shards, report=None, net=None, digests=None) -> Iterator[dict]:
    """Samples of the shards one after the other. A shard that fails to read (truncated, corrupt,
    unreadable) or holds no sample at all is a ShardError; given `report`, it is reported instead
    and the stream goes on with the next shard (`report` raises once the budget is spent, so a
    stream of nothing but bad shards ends). A remote shard that still fails after its retries
    (`net`) is a bad shard like any other."""
    for shard in shards:
        try:
            empty = True
            for sample in tar_samples(shard, net, (digests or {}).get(shard)):
                empty = False
                yield sample
            if empty:
                raise ShardError(f"shard {shard}: holds no samples")
        except ShardError as exc:
            if report is None:
                raise
            report(exc)


class SkipBudgetSpent(ShardError):
    """data.max_skipped was exceeded while assembling one batch: the stream ends with this one line
    (reported once, never counted as one more bad sample)."""


class _TrainRoles(IterableDataset):
    def __init__(self, shards, decoder, batch_size, per_role, roles, seed, rank, start_batch, buffer,
                 on_error="raise", max_skipped=100, net=None, digests=None):
        self.digests = digests or {}  # shard -> meta.json's sha256, checked as each shard is read
        self.net = net or remote.DEFAULT
        self.on_error = on_error
        self.max_skipped = max_skipped
        self.skipped = 0  # bad samples/shards skipped since the last batch (on_error="skip")
        self.skipped_in_batch = 0  # ... while assembling the current batch (or fast-forwarding one)
        self.reported = 0  # ... by this worker so far, for rate-limited warnings
        self.shards = [str(p) for p in shards]
        self.decoder = decoder
        self.batch_size = batch_size
        self.per_role = per_role
        self.roles = roles
        self.seed = seed
        self.rank = rank
        self.start_batch = start_batch
        self.buffer = buffer

    def _epoch_samples(self, role: int, epoch: int) -> Iterator[dict]:
        """Raw (undecoded) samples of one role and epoch: resampled shards through a shuffle buffer."""
        rng = random.Random(_seed(self.seed, self.rank, role, epoch))

        def resampled_shards():
            while True:
                yield rng.choice(self.shards)

        samples = _shard_samples(resampled_shards(), self._report if self.on_error == "skip" else None,
                                 self.net, self.digests)
        return shuffled(samples, self.buffer, min(self.buffer, 100), rng)

    def _report(self, exc: Exception) -> None:
        """Counts a skipped sample or shard and warns (rate-limited). The engine holds the budget
        over all ranks and workers, but only learns of skips with a finished batch: a worker that
        skips more than max_skipped while assembling one batch (the total can only be larger)
        stops here instead of looping on bad data."""
        self.skipped += 1
        self.skipped_in_batch += 1
        self.reported += 1
        if self.skipped_in_batch > self.max_skipped:
            raise SkipBudgetSpent(f"more than data.max_skipped={self.max_skipped} bad samples or shards skipped "
                             f"while assembling one batch (data.on_error=skip); the last: {exc}") from None
        n = self.reported
        if n <= FULL_WARNINGS:
            print(f"warning: skipping bad data (data.on_error=skip): {exc}", file=sys.stderr, flush=True)
        elif n & (n - 1) == 0:
            print(f"warning: {n} bad samples or shards skipped so far by this data loader "
                  f"(data.on_error=skip; warnings are now summarised), the latest: {exc}",
                  file=sys.stderr, flush=True)

    def _decoded(self, stream, rng):
        if self.on_error != "skip":
            return self.decoder(next(stream), rng)
        while True:
            try:
                return self.decoder(next(stream), rng)
            except SkipBudgetSpent:  # (spent while a whole shard was reported: not a bad sample itself)
                raise
            except ShardError as exc:
                self._report(exc)

    def role_batches(self, role: int, local_start: int):
        """(images, labels, bad samples skipped since the previous batch) of one role, forever."""
        epoch, skip = divmod(local_start, self.per_role)
        while True:
            stream = self._epoch_samples(role, epoch)
            for _ in range(skip):
                self.skipped_in_batch = 0
                for _ in range(self.batch_size):
                    next(stream)
            for local in range(skip, self.per_role):
                self.skipped_in_batch = 0
                # Crops and flips of this batch: their own RNG, so skipping batches on resume
                # (which decodes nothing) leaves the later ones exactly as they were.
                rng = random.Random(_seed(self.seed, self.rank, role, epoch, local, AUGMENT)) \
                    if self.decoder.random else None
                images, labels = _collate([self._decoded(stream, rng) for _ in range(self.batch_size)])
                skipped, self.skipped = self.skipped, 0
                yield images, labels, skipped
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        b = self.start_batch + worker
        return self.role_batches(b % self.roles, b // self.roles)


class TrainStream:
    """Infinite iterable of (images (B,C,H,W) in [-1,1], labels (B,) (-1 when unknown), skipped)
    for one rank; `skipped` counts bad samples or shards passed over since the previous batch of
    the same worker (always 0 unless on_error="skip").

    on_error="skip" goes on past bad samples and unreadable shards (the first few reported on
    stderr in full, then in summary lines); the caller enforces the budget over the run from the
    counts, and a worker that skips more than `max_skipped` (data.max_skipped) while assembling one
    batch raises ShardError itself. Resuming stays exact only if no sample was skipped earlier in
    the same epoch (the fast-forward counts raw samples without decoding them).
    """

    def __init__(self, folder, split, batch_size, *, seed, rank=0, world_size=1, num_workers=0,
                 start_batch=0, shuffle_buffer=2000, on_error="raise", max_skipped=100, net=None,
                 count=0, resolution=0, channels=0, crop="center", flip=False, verify=True):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}: expected raise or skip")
        # `folder`: any source of bidvl.data.remote; `count`, `resolution`, `channels`: for shards
        # without meta.json (data.train_count, data.resolution, data.channels); `crop`, `flip`:
        # data.crop, data.flip (SampleDecoder).
        self.meta, shards, _ = split_info(folder, split, net, count, resolution, channels)
        count = self.meta["splits"][split]["count"]
        roles = max(1, num_workers)
        per_role = math.ceil(count / (batch_size * world_size * roles))
        self.batches_per_epoch = per_role * roles
        self.num_workers = num_workers
        # The shuffle buffer restarts every epoch (each epoch is a pure function of its seed), so
        # its leftover is read but not used: cap it at a quarter of a role's epoch.
        buffer = max(1, min(shuffle_buffer, per_role * batch_size // 4))
        self.dataset = _TrainRoles(
            shards, _decoder(self.meta, crop, flip), batch_size, per_role, roles, seed, rank, start_batch, buffer,
            on_error, max_skipped, net, _digests(self.meta, split, shards) if verify else None,
        )

    def __iter__(self):
        if self.num_workers == 0:
            return iter(self.dataset)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers,
            prefetch_factor=4, persistent_workers=False, worker_init_fn=loader_workers.worker_init,
            generator=_own_generator(),
        )
        return loader_workers.start(loader)


def train_stream(folder, split="train", batch_size=64, **kwargs) -> TrainStream:
    return TrainStream(folder, split, batch_size, **kwargs)


# ---------------------------------------------------------------- evaluation


class _EvalShards(IterableDataset):
    """One rank's evaluation samples: the shards `mine` (indices into `shards`), keeping only
    samples whose global index % world_size == `modulo` when samples (not shards) are dealt."""

    def __init__(self, shards, counts, mine, modulo, decoder, batch_size, world_size, net=None, digests=None):
        self.net = net
        self.digests = digests or {}
        self.shards = [str(p) for p in shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.mine = mine
        self.modulo = modulo
        self.decoder = decoder
        self.batch_size = batch_size
        self.world_size = world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = []
        for k in self.mine[worker::workers]:
            samples = tar_samples(self.shards[k], self.net, self.digests.get(self.shards[k]))
            for j, sample in enumerate(samples):
                index = self.offsets[k] + j
                if self.modulo is not None and index % self.world_size != self.modulo:
                    continue
                image, label = self.decoder(sample)
                batch.append((image, label, index))
                if len(batch) == self.batch_size:
                    yield _pad(batch, self.batch_size)
                    batch = []
        if batch:
            yield _pad(batch, self.batch_size)


def _pad(batch, batch_size):
    n = len(batch)
    images = _to_float(np.stack([b[0] for b in batch] + [batch[-1][0]] * (batch_size - n)))
    labels = torch.tensor([b[1] for b in batch] + [-1] * (batch_size - n), dtype=torch.long)
    index = torch.tensor([b[2] for b in batch] + [-1] * (batch_size - n), dtype=torch.long)
    return images, labels, index


class EvalStream:
    """Finite iterable of (images, labels, index) padded batches; same batch count on every rank."""

    def __init__(self, folder, split, batch_size, *, rank=0, world_size=1, num_workers=0, net=None,
                 resolution=0, channels=0, verify=True):
        # `resolution`, `channels`: what images of shards without meta.json are fitted to.
        self.meta, shards, counts = split_info(folder, split, net, 0, resolution, channels)
        # Whole shards are dealt to ranks when there are enough of them; otherwise every rank reads
        # every shard and keeps the samples i with i % world_size == rank (in one worker).
        by_sample = len(counts) < world_size
        shards_of = [list(range(len(counts))) if by_sample else list(range(r, len(counts), world_size))
                     for r in range(world_size)]

        def batches_of(r):  # each worker batches its own samples: count its partial batch too
            if by_sample:
                return math.ceil(len(range(r, sum(counts), world_size)) / batch_size)
            w = max(1, min(num_workers, len(shards_of[r])))
            return sum(math.ceil(sum(counts[k] for k in shards_of[r][i::w]) / batch_size) for i in range(w))

        self.num_batches = max(batches_of(r) for r in range(world_size))
        self.num_workers = 0 if by_sample else min(num_workers, len(shards_of[rank]))
        self.batch_size = batch_size
        self.dataset = _EvalShards(
            shards, counts, shards_of[rank], rank if by_sample else None,
            _decoder(self.meta), batch_size, world_size, net, _digests(self.meta, split, shards) if verify else None,
        )

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        if self.num_workers == 0:
            source = iter(self.dataset)
        else:
            source = loader_workers.start(DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                              worker_init_fn=loader_workers.worker_init, generator=_own_generator()))
        produced = 0
        last = None
        for batch in source:
            produced += 1
            last = batch
            yield batch
        channels, res = self.meta["channels"], self.meta["resolution"]
        while produced < self.num_batches:
            produced += 1
            filler = last[0] if last is not None else torch.zeros(self.batch_size, channels, res, res)
            yield (filler, torch.full((self.batch_size,), -1, dtype=torch.long),
                   torch.full((self.batch_size,), -1, dtype=torch.long))


def eval_stream(folder, split="test", batch_size=100, **kwargs) -> EvalStream:
    return EvalStream(folder, split, batch_size, **kwargs)
