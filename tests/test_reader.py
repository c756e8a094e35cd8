"""The streaming reader: per-rank batch counts, exactly-once evaluation, determinism, resume, strictness.

Shards are written here by hand (tarfile + PIL) so the reader is tested independently of the writers.
"""

import io
import itertools
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bidvl.data import ShardError, eval_stream, train_stream
from bidvl.data.meta import shard_name, write_meta


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def png_bytes(array, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder, count=50, per_shard=7, res=8, split="train", extra=None):
    """Sample i is a constant image of value i (so tests can read the index back) with cls i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, i, k = [], 0, 0
    while i < count:
        n = min(per_shard, count - i)
        members = []
        for j in range(i, i + n):
            members.append((f"s{j:05d}.png", png_bytes(np.full((res, res), j, np.uint8))))
            members.append((f"s{j:05d}.cls", str(j % 10).encode()))
            if extra and j in extra:
                members.append((f"s{j:05d}.{extra[j][0]}", extra[j][1]))
        write_tar(folder / shard_name(split, k), members)
        shards.append({"name": shard_name(split, k), "count": n})
        i, k = i + n, k + 1
    write_meta(folder, {"source": "test", "resolution": res, "channels": 1, "num_classes": 10,
                        "options": {}, "splits": {split: {"count": count, "shards": shards}}})
    return folder


def sample_ids(images):
    """Recover sample indices from constant images (value i mapped to [-1,1])."""
    return ((images[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()


def test_train_batches_shape_range_labels(tmp_path):
    folder = make_shards(tmp_path / "s")
    stream = train_stream(folder, "train", batch_size=5, seed=0)
    images, labels, skipped = next(iter(stream))
    assert skipped == 0
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert [i % 10 for i in sample_ids(images)] == labels.tolist()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.process
def test_train_stream_equal_batches_per_rank_and_deterministic(tmp_path, workers):
    folder = make_shards(tmp_path / "s", count=53)
    streams = [train_stream(folder, "train", batch_size=4, seed=3, rank=r, world_size=2,
                            num_workers=workers) for r in range(2)]
    # ceil(53 / (4 * 2 * R)) batches per role, R roles: the same on both ranks.
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch
    n = streams[0].batches_per_epoch
    first = [sample_ids(b[0]) for b in itertools.islice(iter(streams[0]), 2 * n)]
    again = [sample_ids(b[0]) for b in itertools.islice(iter(streams[0]), 2 * n)]
    other = [sample_ids(b[0]) for b in itertools.islice(iter(streams[1]), 2 * n)]
    assert first == again  # same seed, rank, workers -> same stream
    assert first != other  # ranks see different data
    # One epoch on one rank covers about half the data (resampled shards: not exactly).
    assert len(set(itertools.chain(*first[:n]))) > 53 // 4


@pytest.mark.parametrize("workers", [0, 2, 3])
@pytest.mark.process
def test_train_stream_resumes_exactly(tmp_path, workers):
    folder = make_shards(tmp_path / "s", count=40)
    kwargs = dict(batch_size=3, seed=7, rank=1, world_size=2, num_workers=workers)
    full = [sample_ids(b[0]) for b in itertools.islice(iter(train_stream(folder, "train", **kwargs)), 20)]
    for start in (1, 5, 7, 13):
        resumed = train_stream(folder, "train", start_batch=start, **kwargs)
        got = [sample_ids(b[0]) for b in itertools.islice(iter(resumed), 20 - start)]
        assert got == full[start:], f"start_batch={start}"


@pytest.mark.parametrize("count,per_shard,world,workers", [
    (50, 7, 2, 2),   # 8 shards: whole shards dealt to ranks
    (50, 50, 2, 2),  # 1 shard < 2 ranks: samples dealt round-robin
    (13, 2, 3, 1),   # uneven: some ranks get fewer samples and pad
])
@pytest.mark.process
def test_eval_stream_covers_every_sample_exactly_once(tmp_path, count, per_shard, world, workers):
    folder = make_shards(tmp_path / "s", count=count, per_shard=per_shard)
    streams = [eval_stream(folder, "train", batch_size=4, rank=r, world_size=world,
                           num_workers=workers) for r in range(world)]
    seen, lengths = [], []
    for s in streams:
        batches = list(s)
        lengths.append(len(batches))
        assert len(batches) == len(s)
        for images, labels, index in batches:
            assert images.shape == (4, 1, 8, 8)
            keep = index >= 0
            assert sample_ids(images[keep]) == index[keep].tolist()
            assert (labels[keep] == index[keep] % 10).all()
            seen += index[keep].tolist()
    assert len(set(lengths)) == 1  # same number of batches on every rank: gathers never hang
    assert sorted(seen) == list(range(count))


@pytest.mark.parametrize("workers,count,world", [
    (0, 13, 3),  # 7 shards of 2: ranks hold 5, 4, 4 samples: 2, 1, 1 batches of 4
    (2, 3, 2),   # 3 shards of 1: rank 0 reads two in two workers (2 batches), rank 1 one (1 batch)
])
@pytest.mark.process
def test_a_rank_with_fewer_batches_pads_with_marked_batches(tmp_path, workers, count, world):
    """Every rank yields len(stream) batches (a gather on a missing batch would hang); a rank with
    fewer repeats its last images, or zeros when it has none, with labels and indices -1."""
    folder = make_shards(tmp_path / "s", count=count, per_shard=2 if count == 13 else 1)
    stream = eval_stream(folder, "train", batch_size=4, rank=1, world_size=world, num_workers=workers)
    batches = list(stream)
    assert len(batches) == len(stream) == 2
    (real, real_labels, real_index), (images, labels, index) = batches
    assert (real_index >= 0).any() and (real_index >= 0).tolist() == (real_labels >= 0).tolist()
    assert torch.equal(images, real) and images.dtype == torch.float32
    for column in (labels, index):
        assert column.dtype == torch.long and column.tolist() == [-1] * 4
    folder = make_shards(tmp_path / "one", count=2, per_shard=2)  # one shard, 3 ranks: rank 2 gets nothing
    empty = eval_stream(folder, "train", batch_size=4, rank=2, world_size=3, num_workers=workers)
    batches = list(empty)
    assert len(batches) == len(empty) == 1
    images, labels, index = batches[0]
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.float32 and not images.any()
    assert labels.tolist() == index.tolist() == [-1] * 4 and labels.dtype == index.dtype == torch.long


def test_evaluation_deals_whole_shards_to_ranks_or_samples_when_shards_are_fewer(tmp_path):
    """With at least as many shards as ranks each rank reads whole shards (shard k to rank k mod
    world); with fewer, every rank reads all and keeps the samples i with i mod world == rank."""
    def indices(folder, rank, world, workers=0):
        stream = eval_stream(folder, "train", batch_size=4, rank=rank, world_size=world, num_workers=workers)
        return [i for _, _, index in stream for i in index.tolist() if i >= 0]

    two = make_shards(tmp_path / "two", count=8, per_shard=4)
    assert indices(two, 0, 2) == [0, 1, 2, 3] and indices(two, 1, 2) == [4, 5, 6, 7]
    assert indices(two, 0, 1) == list(range(8))
    one = make_shards(tmp_path / "one", count=8, per_shard=8)
    assert indices(one, 0, 2) == [0, 2, 4, 6] and indices(one, 1, 2, workers=2) == [1, 3, 5, 7]
    three = make_shards(tmp_path / "three", count=9, per_shard=3)  # fewer shards than 4 ranks: one reader
    for rank in range(4):
        stream = eval_stream(three, "train", batch_size=4, rank=rank, world_size=4, num_workers=2)
        assert len(list(stream)) == len(stream) == 1
    uneven = make_shards(tmp_path / "uneven", count=10, per_shard=5)  # 2 shards of 5, batches of 4
    assert len(eval_stream(uneven, "train", batch_size=4)) == 3  # one reader: 10 samples, 3 batches
    assert len(eval_stream(uneven, "train", batch_size=4, num_workers=2)) == 4  # each worker: 2


def test_a_stream_without_rank_arguments_is_rank_0_of_1(tmp_path):
    folder = make_shards(tmp_path / "s", count=40)
    def first(**kwargs):
        return [sample_ids(b[0]) for b in itertools.islice(iter(train_stream(folder, "train", batch_size=4,
                                                                             seed=1, **kwargs)), 3)]

    assert first() == first(rank=0, world_size=1, num_workers=0) != first(rank=1)


def test_pickle_member_is_refused_naming_shard_and_member(tmp_path):
    folder = make_shards(tmp_path / "s", count=10, extra={3: ("pyd", b"\x80\x04K\x01.")})
    with pytest.raises(ShardError, match=r"train-000000\.tar.*s00003.*\.pyd"):
        list(eval_stream(folder, "train", batch_size=4))


def test_wrong_image_size_is_refused(tmp_path):
    folder = make_shards(tmp_path / "s", count=10, res=8)
    meta = (folder / "meta.json").read_text().replace('"resolution": 8', '"resolution": 16')
    (folder / "meta.json").write_text(meta)
    with pytest.raises(ShardError, match="8x8, expected 16x16"):
        next(iter(train_stream(folder, "train", batch_size=2, seed=0)))


def test_missing_meta_and_split_are_named(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        train_stream(tmp_path / "nope", "train", batch_size=2, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="meta.json is missing"):
        train_stream(tmp_path / "empty", "train", batch_size=2, seed=0)
    folder = make_shards(tmp_path / "s", count=10)
    with pytest.raises(ShardError, match="no split 'test'"):
        eval_stream(folder, "test")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(tmp_path, fmt):
    from bidvl.data.tarstream import tar_members

    long_dir = "d" * 120  # needs a GNU long name or pax path (ustar: prefix field)
    members = [(f"{long_dir}/s{i}.png", bytes([i]) * (100 + 700 * i)) for i in range(4)]
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir_info("adir"))
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert [(n, bytes(c)) for n, c in tar_members(str(path))] == members


def _dir_info(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    folder = make_shards(tmp_path / "s", count=10, per_shard=10)
    shard = folder / shard_name("train", 0)
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(ShardError, match=r"train-000000\.tar.*truncated"):
        list(eval_stream(folder, "train", batch_size=4))
    corrupt = bytearray(good)
    corrupt[1024 + 10] ^= 0xFF  # the second member's header (the first PNG fits one block)
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match=r"train-000000\.tar.*(checksum|corrupt)"):
        list(eval_stream(folder, "train", batch_size=4))


# Batches 0, 1, 6, 7, 8, 9 of make_shards(count=53), batch 4, seed 3, 2 ranks, shuffle buffer 10
# (epochs of 7 batches with no workers, 2 roles x 4 with two): recorded 2026-12-06. The data order
# is part of what a run is (resumes and reruns depend on it); a change to it must be deliberate.
GOLDEN_ORDER = {
    (0, 0): [[35, 40, 36, 38], [37, 39, 41, 41], [36, 5, 0, 3], [19, 14, 20, 15], [17, 14, 18, 20], [18, 17, 15, 45]],
    (0, 1): [[36, 39, 41, 38], [40, 30, 32, 34], [42, 44, 37, 45], [40, 37, 36, 30], [28, 38, 32, 39], [31, 35, 33, 34]],
    (2, 0): [[35, 37, 36, 41], [44, 46, 42, 45], [41, 38, 0, 3], [48, 8, 9, 10], [15, 17, 14, 19], [8, 9, 10, 7]],
    (2, 1): [[36, 37, 38, 41], [15, 14, 16, 17], [50, 51, 35, 42], [18, 28, 31, 19], [37, 38, 36, 39], [28, 31, 30, 29]],
}


@pytest.mark.parametrize("workers, rank", sorted(GOLDEN_ORDER))
@pytest.mark.process
def test_the_data_order_is_pinned(tmp_path, workers, rank):
    """The order is a pure function of (seed, rank, role, epoch): pinned here across an epoch
    boundary, so a change to the seeding, the roles or the shuffle buffer shows."""
    folder = make_shards(tmp_path / "s", count=53)
    stream = train_stream(folder, "train", batch_size=4, seed=3, rank=rank, world_size=2, num_workers=workers,
                          shuffle_buffer=10)
    assert stream.batches_per_epoch == (7 if workers == 0 else 8)
    batches = [sample_ids(b[0]) for b in itertools.islice(iter(stream), 10)]
    assert [batches[i] for i in (0, 1, 6, 7, 8, 9)] == GOLDEN_ORDER[(workers, rank)]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.process
def test_a_loader_with_workers_leaves_torch_global_rng_alone(tmp_path, split):
    """The training noise comes from torch's global RNG, which checkpoints save; a DataLoader draws
    its workers' base seed from it unless given its own generator. Opening a loader (a resume, a
    rollback, a periodic evaluation) must not move it, or a resumed run draws other noise."""
    folder = make_shards(tmp_path / "s", count=20, split=split)
    if split == "train":
        stream = train_stream(folder, "train", batch_size=4, seed=0, num_workers=2)
    else:
        stream = eval_stream(folder, "test", batch_size=4, num_workers=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = iter(stream)
    next(batches)
    assert torch.equal(torch.get_rng_state(), before)
    del batches


def test_the_order_with_a_shuffle_buffer_over_100_is_pinned(tmp_path):
    """The shuffle buffer starts yielding after min(buffer, 100) samples: a buffer of 120 needs more
    samples than one pixel can number, so ids are written in two pixels (low, high byte)."""
    folder, shards = tmp_path / "wide", []
    folder.mkdir()
    for k in range(4):
        members = []
        for j in range(k * 120, (k + 1) * 120):
            image = np.zeros((8, 8), np.uint8)
            image[0, 0], image[0, 1] = j % 256, j // 256
            members += [(f"s{j:05d}.png", png_bytes(image)), (f"s{j:05d}.cls", b"0")]
        write_tar(folder / shard_name("train", k), members)
        shards.append({"name": shard_name("train", k), "count": 120})
    write_meta(folder, {"source": "test", "resolution": 8, "channels": 1, "num_classes": 10, "options": {},
                        "splits": {"train": {"count": 480, "shards": shards}}})
    stream = train_stream(folder, "train", batch_size=8, seed=5)
    assert stream.dataset.buffer == 120
    ids = []
    for images, _, _ in itertools.islice(iter(stream), 2):
        pixels = ((images[:, 0, 0, :2] + 1) * 127.5).round().long()
        ids.append((pixels[:, 0] + 256 * pixels[:, 1]).tolist())
    assert ids == [[252, 248, 296, 329, 297, 247, 324, 267], [303, 346, 241, 271, 316, 312, 345, 298]]


def test_an_explicit_local_shard_list_with_its_count_streams_its_shards(tmp_path):
    """`.../train-{000000..000001}.tar` with count, resolution and channels given (data.train_count,
    without meta.json): the stream reads those shards only, at that size."""
    folder = make_shards(tmp_path / "s", count=50, per_shard=10)  # 5 shards
    (folder / "meta.json").unlink()
    listed = f"{folder}/train-{{000000..000001}}.tar"
    stream = train_stream(listed, "train", batch_size=4, seed=0, count=20, resolution=8, channels=1)
    assert stream.meta["resolution"] == 8 and stream.meta["channels"] == 1
    assert stream.batches_per_epoch == 5  # 20 samples in batches of 4
    seen = {i for b in itertools.islice(iter(stream), 10) for i in sample_ids(b[0])}
    assert seen <= set(range(20)) and len(seen) > 10


def test_an_unknown_on_error_is_named():
    with pytest.raises(ValueError, match=r"^data.on_error='ignore': expected raise or skip$"):
        train_stream("unused", "train", batch_size=4, seed=0, on_error="ignore")


@pytest.mark.parametrize("count,batch_size,expected", [
    (3, 1, [[0], [1], [2], [0], [1], [2]]),  # buffer max(1, 3 // 4) = 1: no shuffling within a shard
    (50, 3, [[10, 5, 9], [12, 3, 8], [11, 13, 14]]),  # buffer 17 * 3 // 4 = 12 (not 12.75)
])
def test_small_shuffle_buffers_are_pinned(tmp_path, count, batch_size, expected):
    folder = make_shards(tmp_path / "s", count=count, per_shard=count)
    stream = train_stream(folder, "train", batch_size=batch_size, seed=2)
    got = [sample_ids(b[0]) for b in itertools.islice(iter(stream), len(expected))]
    assert got == expected
